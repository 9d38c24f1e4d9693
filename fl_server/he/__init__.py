"""The server's side of CKKS aggregation (homomorphic encryption beside masking in fl_server/secagg)."""

from fl_server.he.aggregator import CKKSAggregator, CKKSRoundStats, EncryptedUpdate, open_ckks_round, pick_decryptor

__all__ = ["CKKSAggregator", "CKKSRoundStats", "EncryptedUpdate", "open_ckks_round", "pick_decryptor"]
