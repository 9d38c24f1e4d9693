"""The server's side of CKKS aggregation behind the ``Aggregator`` interface: the strategy sees a
decrypted sum, never an update, and the server never holds a key that decrypts anything.

A round runs: the coordinator plans it (:func:`open_ckks_round` picks the decryptor among the
selected clients, from the run seed); the decryptor sends its public key
(:meth:`CKKSAggregator.receive_public_key`); clients send :class:`EncryptedUpdate` s, which
``add`` checks and folds into a running ciphertext sum (memory O(model), not O(clients x model));
at close, the driver sends :meth:`CKKSAggregator.encrypted_sum` to the decryptor and hands its
answer to :meth:`CKKSAggregator.receive_decrypted`; ``result`` then feeds the wrapped aggregator
exactly as masking's :class:`~fl_server.secagg.SecureAggregator` does (weighted mean as one
synthetic update, the DP sum as ``count`` shares, SCAFFOLD's two means).

Dropouts: a client that never sends its ciphertexts is simply not in the sum (no recovery phase is
needed, unlike masking). If the decryptor does not answer, the round cannot be released and is
aborted; the driver plans it again with a fresh key and decryptor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fl_common.config import ConfigError, FLConfig
from fl_common.he import (
    CKKSParams,
    DecryptedSum,
    EncryptedInput,
    EncryptedSum,
    Encryptor,
    HEMessageError,
    HESums,
    PublicKey,
    decode_sum,
    load_ciphertexts,
)
from fl_common.protocol import ClientUpdate, TrainInstructions, derive_seed
from fl_server.secagg.aggregator import CLEAR_METRICS, secagg_mode, weight_bound_for
from fl_server.strategies.base import AggregateResult, Aggregator, UpdateRejected

log = logging.getLogger("fl_server.he")

ClientId = int | str


@dataclass
class EncryptedUpdate(ClientUpdate):
    """A client's ciphertexts as the coordinator receives them (``delta`` is empty)."""

    encrypted: EncryptedInput | None = None

    @classmethod
    def wrap(cls, client_id: ClientId, round_number: int, encrypted: EncryptedInput, *,
             metrics: Mapping[str, float] | None = None) -> EncryptedUpdate:
        clear = {k: float(v) for k, v in (metrics or {}).items() if k in CLEAR_METRICS}
        return cls(client_id=client_id, round=round_number, delta=torch.zeros(0), num_samples=1, metrics=clear,
                   wire_bytes=encrypted.wire_size(), encrypted=encrypted)


@dataclass
class CKKSRoundStats:
    """What a finished (or aborted) CKKS round reports to the run's summary."""

    round: int
    clients: int
    summed: int
    decryptor: str
    ciphertexts_per_client: int
    bytes_up_per_client: float
    bytes_sum: int
    bytes_public_key: int
    clipped: int = 0
    aborted: str | None = None
    server_cpu_seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)


class CKKSAggregator(Aggregator):
    """The round's aggregator under CKKS (see the module docstring)."""

    def __init__(self, inner: Aggregator, params: CKKSParams) -> None:
        self.inner = inner
        self.mode = secagg_mode(inner)
        self.params = params
        self._encryptor: Encryptor | None = None
        self._public_key: PublicKey | None = None
        self._sum: list[Any] | None = None
        self._senders: list[str] = []
        self._input_bytes = 0
        self._key_bytes = 0
        self._decrypted: DecryptedSum | None = None
        self.server_cpu_seconds = 0.0
        self.aborted: str | None = None

    # ------------------------------------------------------------------ phases
    @property
    def public_key(self) -> PublicKey | None:
        """The decryptor's public key once received (what every selected client downloads)."""
        return self._public_key

    def receive_public_key(self, key: PublicKey) -> None:
        """Check and keep the decryptor's public key (HEMessageError if it is not the decryptor's, or leaks a secret)."""
        if self._encryptor is not None:
            raise HEMessageError(f"round {self.params.round} already has its public key")
        t0 = time.process_time()
        self._encryptor = Encryptor(self.params, key)
        self._public_key = key
        self._key_bytes = len(key.to_bytes())
        self.server_cpu_seconds += time.process_time() - t0

    def add(self, update: ClientUpdate) -> None:
        if not isinstance(update, EncryptedUpdate) or update.encrypted is None:
            raise UpdateRejected("not_encrypted", f"CKKS aggregation is on: the update of client {update.client_id} must be "
                                 f"ciphertexts, never a plain delta")
        enc = update.encrypted
        if self._encryptor is None:
            raise UpdateRejected("no_key", f"round {self.params.round} has no public key yet")
        if self._decrypted is not None or self.aborted:
            raise UpdateRejected("closed", f"round {self.params.round} is no longer accepting inputs")
        if enc.sender != str(update.client_id) or enc.sender not in self.params.clients:
            raise UpdateRejected("wrong_sender", f"client {update.client_id} sent ciphertexts as {enc.sender!r}")
        if enc.round != self.params.round:
            raise UpdateRejected("wrong_round", f"ciphertexts for round {enc.round}, the round is {self.params.round}")
        if enc.sender in self._senders:
            raise UpdateRejected("duplicate", f"client {enc.sender} already sent its ciphertexts")
        t0 = time.process_time()
        try:
            vectors = load_ciphertexts(self._encryptor.context, self.params, enc.ciphertexts)
        except HEMessageError as exc:
            raise UpdateRejected("bad_ciphertext", str(exc)) from None
        finally:
            self.server_cpu_seconds += time.process_time() - t0
        t0 = time.process_time()
        if self._sum is None:
            self._sum = vectors
        else:
            for acc, v in zip(self._sum, vectors, strict=True):
                acc += v
        self.server_cpu_seconds += time.process_time() - t0
        self._senders.append(enc.sender)
        self._input_bytes += enc.wire_size()

    @property
    def num_updates(self) -> int:
        return len(self._senders)

    @property
    def senders(self) -> tuple[str, ...]:
        return tuple(self._senders)

    def encrypted_sum(self) -> EncryptedSum:
        """The ciphertext sum for the decryptor (the inputs are closed from here on)."""
        if self._sum is None:
            raise RuntimeError(f"round {self.params.round}: no ciphertexts to sum")
        t0 = time.process_time()
        out = EncryptedSum(self.params.round, len(self._senders), tuple(v.serialize() for v in self._sum))
        self.server_cpu_seconds += time.process_time() - t0
        return out

    def receive_decrypted(self, answer: DecryptedSum) -> None:
        p = self.params
        if answer.sender != p.decryptor or answer.round != p.round:
            raise HEMessageError(f"decrypted sum from {answer.sender!r} for round {answer.round}; expected the decryptor "
                                 f"{p.decryptor!r} of round {p.round}")
        if answer.values.shape != (p.plain_length,):
            raise HEMessageError(f"decrypted sum has {answer.values.size} values, the layout has {p.plain_length}")
        self._decrypted = answer

    def abort(self, reason: str) -> None:
        self.aborted = reason

    # ------------------------------------------------------------------ result
    def sums(self) -> HESums:
        if self._decrypted is None:
            raise RuntimeError(f"round {self.params.round}: the sum has not been decrypted")
        return decode_sum(self.params, self._decrypted.values, len(self._senders))

    def result(self) -> AggregateResult:
        sums = self.sums()
        count = sums.count
        delta = torch.from_numpy(sums.delta)
        r = self.params.round
        if self.mode == "dp":
            share = delta / count
            ones = None if sums.unclipped is None else round(sums.unclipped)
            for i in range(count):
                bit = {} if ones is None else {"dp_unclipped": 1.0 if i < ones else 0.0}
                self.inner.add(ClientUpdate(client_id=f"ckks-sum-{i}", round=r, delta=share, num_samples=1, metrics=bit))
            return self.inner.result()
        total_weight = round(sums.weight)
        if total_weight < count:
            raise RuntimeError(f"round {r}: the decrypted weight {sums.weight:.3f} is below its {count} inputs")
        metrics: dict[str, float] = {}
        if sums.loss is not None:
            metrics["train_loss"] = sums.loss
        # sum(f_k d_k) W / sum(f_k W) = sum(n_k d_k) / sum(n_k): the weighted mean (scaffold is refused when planned)
        mean = delta * (self.params.weight_bound / sums.weight)
        self.inner.add(ClientUpdate(client_id="ckks-sum", round=r, delta=mean, num_samples=total_weight, metrics=metrics))
        return dataclasses.replace(self.inner.result(), num_updates=count)

    def stats(self) -> CKKSRoundStats:
        p = self.params
        n = max(1, len(self._senders))
        return CKKSRoundStats(round=p.round, clients=len(p.clients), summed=len(self._senders) if self._decrypted else 0,
                              decryptor=p.decryptor, ciphertexts_per_client=p.num_ciphertexts,
                              bytes_up_per_client=self._input_bytes / n,
                              bytes_sum=0, bytes_public_key=self._key_bytes, aborted=self.aborted,
                              server_cpu_seconds=self.server_cpu_seconds,
                              params={"ring_dimension": p.ring_dimension, "coeff_mod_bits": list(p.coeff_mod_bits),
                                      "scale_bits": p.scale_bits, "slots": p.slots, "ciphertexts": p.num_ciphertexts,
                                      "error_bound_per_slot": p.error_bound(len(p.clients))})


def pick_decryptor(seed: int, round_number: int, selected: Sequence[ClientId], now: float = 0.0) -> str:
    """The round's decryptor: one selected client, drawn from (seed, round, the driver's clock at planning). The
    simulation plans at now = 0 (reproducible runs); over REST a new attempt of the same round (after a decryptor
    that never answered) draws again instead of waiting on the same silent client."""
    return str(selected[derive_seed(seed, round_number, repr(float(now)), "ckks-decryptor") % len(selected)])


def open_ckks_round(cfg: FLConfig, round_number: int, selected: Sequence[ClientId],
                    instructions: Mapping[ClientId, TrainInstructions], inner: Aggregator, numel: int, *,
                    sizes: Mapping[ClientId, int | None], now: float = 0.0) -> CKKSAggregator:
    """What the coordinator calls when it plans a round with ``secure_aggregation_method: ckks``."""
    mode = secagg_mode(inner)
    if mode == "scaffold":
        raise ConfigError("scaffold under secure_aggregation_method 'ckks' is not built (its variate deltas would double "
                          "the ciphertexts); use secure_aggregation_method: masking, or another aggregation_method")
    if len(selected) < 2:
        raise ConfigError(f"CKKS aggregation needs at least 2 clients per round (the decryptor refuses a sum of one), round "
                          f"{round_number} selected {len(selected)}")
    common: dict[str, Any] = dict(round=round_number, clients=tuple(str(c) for c in selected),
                                  decryptor=pick_decryptor(cfg.seed, round_number, selected, now), vector_length=numel)
    if mode == "dp":
        first = next(iter(instructions.values()))
        clip, noise = float(first.update_clip), float(first.update_noise_std)
        if clip <= 0:
            raise ConfigError("client-level DP under CKKS aggregation needs the clients to clip their updates")
        params = CKKSParams(**common, clip=clip, weighted=False, l2_clip=noise == 0.0, noise_std=noise,
                            with_unclipped=bool(first.report_clip_bit))
    else:
        bound = weight_bound_for(selected, sizes)
        if bound is None:
            raise ConfigError("CKKS aggregation of a sample-weighted mean needs every selected client's number of records "
                              "(the public bound W of the weights); the driver must report them")
        params = CKKSParams(**common, clip=cfg.secagg_clip_norm, weighted=True, weight_bound=bound,
                            with_loss=not cfg.differential_privacy)
    return CKKSAggregator(inner, params)


__all__ = ["CKKSAggregator", "CKKSRoundStats", "EncryptedUpdate", "open_ckks_round", "pick_decryptor"]
