"""CKKS keys: the round's decryptor makes a key pair, publishes the public half, and later decrypts
the sum (and only the sum: it never receives another client's ciphertexts, which travel to the
server under each client's own transport encryption).

Trust model (see README "Homomorphic encryption"): the server holds no secret key, so alone it sees
ciphertexts only; the decryptor holds the key but sees only the encrypted sum; a server colluding
with the decryptor could decrypt every input. That is weaker than masking (which resists the
server plus up to t-1 clients), and is the price of a single-key scheme (TenSEAL has no multiparty
or threshold decryption).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fl_common.he.backend import tenseal
from fl_common.he.messages import DecryptedSum, EncryptedSum, HEMessageError, PublicKey
from fl_common.he.params import CKKSParams


def _context(params: CKKSParams) -> Any:
    ts = tenseal()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.ring_dimension,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bits))
    ctx.global_scale = 2.0 ** params.scale_bits
    return ctx


class KeyHolder:
    """The decryptor's side: a fresh secret key for one round (never serialized, never sent)."""

    def __init__(self, params: CKKSParams, sender: str) -> None:
        if sender != params.decryptor:
            raise ValueError(f"client {sender} is not this round's decryptor ({params.decryptor})")
        self.params = params
        self.sender = sender
        self._ctx = _context(params)

    def public_key(self) -> PublicKey:
        """The public context: public key only (no relinearisation or Galois keys: only additions run)."""
        blob = self._ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
        return PublicKey(self.params.round, self.sender, blob)

    def decrypt(self, encrypted: EncryptedSum) -> DecryptedSum:
        """Decrypt the server's sum. Refuses a 'sum' of fewer than 2 inputs: decrypting one ciphertext would hand the
        server a single client's update (the only defence a lone decryptor has against being used as an oracle)."""
        p = self.params
        if encrypted.round != p.round:
            raise HEMessageError(f"the sum is for round {encrypted.round}, this key is for round {p.round}")
        if encrypted.count < 2:
            raise HEMessageError(f"refusing to decrypt a sum of {encrypted.count} input(s): it would reveal one update")
        vectors = load_ciphertexts(self._ctx, p, encrypted.ciphertexts)
        sk = self._ctx.secret_key()
        values = np.concatenate([np.asarray(v.decrypt(sk), dtype=np.float64) for v in vectors])
        return DecryptedSum(p.round, self.sender, values)


class Encryptor:
    """A client's (or the server's) view of the round's public key."""

    def __init__(self, params: CKKSParams, key: PublicKey) -> None:
        ts = tenseal()
        if key.round != params.round or key.sender != params.decryptor:
            raise HEMessageError(f"public key from {key.sender!r} for round {key.round}; expected the decryptor "
                                 f"{params.decryptor!r} of round {params.round}")
        try:
            ctx = ts.context_from(key.context)
        except Exception as exc:  # TenSEAL raises ValueError or its own errors on bad protobufs
            raise HEMessageError(f"the CKKS public key does not load: {exc}") from None
        if ctx.is_private():
            raise HEMessageError("the CKKS 'public' key carries a secret key: refusing to use it (its sender leaked it)")
        if ctx.global_scale != 2.0 ** params.scale_bits:
            raise HEMessageError(f"the CKKS public key's scale {ctx.global_scale} is not 2^{params.scale_bits}")
        self.params = params
        self.context = ctx

    def encrypt(self, plain: np.ndarray) -> tuple[bytes, ...]:
        p = self.params
        if plain.shape != (p.plain_length,):
            raise ValueError(f"plain vector has shape {plain.shape}, the round expects ({p.plain_length},)")
        ts = tenseal()
        out: list[bytes] = []
        at = 0
        for n in p.chunk_lengths():
            out.append(ts.ckks_vector(self.context, plain[at:at + n].tolist()).serialize())
            at += n
        return tuple(out)


def load_ciphertexts(ctx: Any, params: CKKSParams, blobs: tuple[bytes, ...]) -> list[Any]:
    """Deserialize and check a list of ciphertexts against the round's layout (count and slot counts)."""
    ts = tenseal()
    lengths = params.chunk_lengths()
    if len(blobs) != len(lengths):
        raise HEMessageError(f"{len(blobs)} ciphertexts, the round's layout has {len(lengths)}")
    out = []
    for i, (blob, n) in enumerate(zip(blobs, lengths, strict=True)):
        try:
            v = ts.ckks_vector_from(ctx, blob)
        except Exception as exc:
            raise HEMessageError(f"ciphertext {i} does not load: {exc}") from None
        if v.size() != n:
            raise HEMessageError(f"ciphertext {i} holds {v.size()} slots, the layout says {n}")
        out.append(v)
    return out


__all__ = ["Encryptor", "KeyHolder", "load_ciphertexts"]
