"""Bytes per update and encode+decode time for every codec x wire compression.

Why: choosing a codec is a bandwidth/accuracy/CPU trade-off, and the numbers depend on the data
(random floats barely compress; delta-coded top-k indices do). The update is the size of the
project's reference model (1,663,370 parameters), random normal with scale 0.01, which is about
what a few local SGD steps produce. Time is the median of 5 runs of encode_update + decode_update
(codec + pack + compression and back) after one warm-up, on one torch thread by default: that
is the per-core cost, and it is far less disturbed by other processes than a multi-threaded run.

    python benchmarks/codec_sizes.py [--numel N] [--repeats R] [--threads T]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fl_common.tensors.wire import COMPRESSIONS, decode_update, encode_update

CODECS = [
    "none",
    "float16",
    "int8",
    "topk:0.01",
    "topk:0.01+float16",
    "topk:0.01+int8",
    "topk:0.05",
    "topk:0.05+int8",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1_663_370)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    update = torch.randn(args.numel, generator=gen) * 0.01
    raw = 4 * args.numel
    print(
        f"update: {args.numel:,} float32 values = {raw:,} bytes; time = median of {args.repeats}"
        f" encode+decode on {torch.get_num_threads()} thread(s)"
    )
    print(f"{'codec':<20}{'compression':<12}{'bytes':>12}{'vs f32':>9}{'ms':>9}{'rel. L2 err':>13}")
    for spec in CODECS:
        for compression in COMPRESSIONS:
            decode_update(encode_update(update, spec, compression, gen), args.numel)  # warm-up
            times, size, err = [], 0, 0.0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                blob = encode_update(update, spec, compression, gen, {"round": 1})
                decoded, _ = decode_update(blob, args.numel)
                times.append(time.perf_counter() - t0)
                size = len(blob)
                err = float((decoded - update).norm() / update.norm())
            ms = 1000 * statistics.median(times)
            print(f"{spec:<20}{compression:<12}{size:>12,}{raw / size:>8.1f}x{ms:>9.1f}{err:>13.4f}")


if __name__ == "__main__":
    main()
