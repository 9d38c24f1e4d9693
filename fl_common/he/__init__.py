"""CKKS homomorphic encryption for aggregation: the server adds ciphertexts, one decryptor per round
decrypts the sum only. Transport-free; the server's sum lives in fl_server/he, the drivers in
fl_server/simulation/ckks.py. TenSEAL (the ``[he]`` extra) is imported lazily (backend.py)."""

from fl_common.he.backend import INSTALL_COMMAND, HEUnavailable, available
from fl_common.he.encoding import HEInput, HESums, decode_sum, encode_input
from fl_common.he.keys import Encryptor, KeyHolder, load_ciphertexts
from fl_common.he.messages import DecryptedSum, EncryptedInput, EncryptedSum, HEMessageError, PublicKey
from fl_common.he.params import CKKSParams

__all__ = ["INSTALL_COMMAND", "CKKSParams", "DecryptedSum", "EncryptedInput", "EncryptedSum", "Encryptor", "HEInput",
           "HEMessageError", "HESums", "HEUnavailable", "KeyHolder", "PublicKey", "available", "decode_sum", "encode_input",
           "load_ciphertexts"]
