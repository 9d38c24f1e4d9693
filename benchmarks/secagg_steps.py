"""One client's secure path and the server's unmasking, step by step, at the cnn's size (issue 12).

10 clients, complete graph (degree 9: each client expands its self mask and 9 pairwise masks), the demo cnn's
1,663,370 parameters plus the scalar segments, two ring widths: the default clip (10, 2^-16 precision: b = 24)
and the private demo's (clip 200: b = 28). Each step is timed alone in this process, CPU seconds
(``time.process_time``, min of ``--reps``: the machine is shared, CPU time is what the step costs, wall time is
what the neighbours leave it), on one core. Only public names that both the PRG v1 (ChaCha20) and v2 (AES-256-CTR)
trees have, so the same script measures before and after:

    PYTHONPATH=$PWD python benchmarks/secagg_steps.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fl_common.secagg.encoding import PlainInput, decode_input_sum, encode_input, pack, unpack
from fl_common.secagg.masks import mask_input, unmask_sum
from fl_common.secagg.planning import plan_params
from fl_common.secagg.precompute import MaskingJob, mask_payload
from fl_common.secagg.prg import expand_seed

CNN_PARAMETERS = 1_663_370
CLIENTS = 10
DEST = Path(__file__).resolve().parent / "results" / "fast_rounds" / "secagg_steps.json"


def _ms(fn: Callable[[], Any], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return round(best * 1e3, 2)


def steps(clip: float, reps: int) -> dict[str, Any]:
    p = plan_params(round_number=1, client_ids=[str(i) for i in range(CLIENTS)], vector_length=CNN_PARAMETERS, clip=clip,
                    scale_bits=16, weighted=True, weight_bound=600, with_loss=True, degree=CLIENTS - 1)
    b, n = p.modulus_bits, p.vector_length
    rng = np.random.default_rng(0)
    delta = rng.normal(0.0, 1e-3, CNN_PARAMETERS).astype(np.float32)  # what a client's training hands over
    plain = PlainInput(delta, weight=600, loss=0.5)
    seeds = {j: rng.bytes(32) for j in range(1, CLIENTS + 1)}
    x, _ = encode_input(p, plain, np.random.default_rng(1))
    y = mask_input(x, 1, seeds[1], {j: seeds[j] for j in range(2, CLIENTS + 1)}, b, context=b"c")
    data = pack(y, b)
    job = MaskingJob(p, 1, seeds[1], {j: seeds[j] for j in range(2, CLIENTS + 1)}, b"c", 1)

    def server_sum() -> np.ndarray:
        total = np.zeros(n, dtype=np.uint64)
        for _ in range(CLIENTS):
            total += unpack(data, n, b)
        return total

    summed = np.zeros(n, dtype=np.uint64)
    for _ in range(CLIENTS):
        summed += x
    summed &= np.uint64((1 << b) - 1)
    out = {
        "modulus_bits": b, "vector_length": n, "payload_bytes": len(data),
        "client": {
            "encode_ms": _ms(lambda: encode_input(p, plain, np.random.default_rng(1)), reps),
            "prg_one_stream_ms": _ms(lambda: expand_seed(seeds[1], n, b, label=b"x"), reps),
            "mask_self_plus_9_pairwise_ms": _ms(
                lambda: mask_input(x, 1, seeds[1], {j: seeds[j] for j in range(2, CLIENTS + 1)}, b, context=b"c"), reps),
            "pack_ms": _ms(lambda: pack(y, b), reps),
        },
        # the three steps as one client runs them (encode into the masking's word, mask in place, pack): what a
        # simulation worker does per client, and a daemon without precomputed masks
        "client_path_ms": _ms(lambda: mask_payload(job, plain), reps),
        "server": {
            "unpack_one_ms": _ms(lambda: unpack(data, n, b), reps),
            "unpack_and_sum_10_ms": _ms(server_sum, reps),
            "remove_10_self_masks_ms": _ms(lambda: unmask_sum(summed, b, survivor_self_seeds=seeds, context=b"c"), reps),
            "decode_ms": _ms(lambda: decode_input_sum(p, summed, CLIENTS), reps),
        },
    }
    out["client"]["sum_of_steps_ms"] = round(sum(v for k, v in out["client"].items() if k != "prg_one_stream_ms"), 2)
    out["server"]["total_ms"] = round(sum(v for k, v in out["server"].items() if k != "unpack_one_ms"), 2)
    return out


def prg_choices(reps: int) -> dict[str, float]:
    """Raw keystream of one cnn-sized mask, in place into a preallocated buffer: ChaCha20 (PRG v1) against AES-CTR
    (AES-NI), 8-byte words (v1) and 4-byte words (v2, b <= 32). What chose PRG v2."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    out: dict[str, float] = {}
    for width in (8, 4):
        buf = bytearray(width * CNN_PARAMETERS + 16)
        data = bytes(width * CNN_PARAMETERS)
        ciphers = {"chacha20": lambda: Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None),
                   "aes128_ctr": lambda: Cipher(algorithms.AES(key[:16]), modes.CTR(bytes(16))),
                   "aes256_ctr": lambda: Cipher(algorithms.AES(key), modes.CTR(bytes(16)))}
        for name, make in ciphers.items():
            out[f"{name}_{width}byte_words_ms"] = _ms(lambda make=make, data=data, buf=buf: make().encryptor().update_into(data, buf), reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(DEST))
    args = ap.parse_args()
    result = {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
              "load_average": list(os.getloadavg()), "clients": CLIENTS,
              "prg_keystream": prg_choices(args.reps),
              "cases": {f"clip{clip:g}": steps(clip, args.reps) for clip in (10.0, 200.0)}}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
