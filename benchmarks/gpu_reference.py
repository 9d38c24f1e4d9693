"""The reference experiment on a GPU: Fashion-MNIST, the cnn, 100 clients, 10 per round, 100 rounds
(configs/reference_speed.yaml with num_rounds=100 and device cuda), clients trained one after
another in the driver process (workers 0: one process owns the GPU), evaluation every 5 rounds as
in the reference config. Prints the time per round and the whole run; writes
benchmarks/results/gpu/reference_<device>.json. The aim (issue 13): 100 rounds in under 60 s on one
modern datacenter GPU (the seed: 45 minutes).

Also measures the first ``--check-rounds`` rounds on the CPU and compares the test accuracy/loss
per evaluated round (same seeds: equal to float tolerance, not bit for bit: cuDNN's kernels sum in
another order).

    python benchmarks/gpu_reference.py --device cuda --rounds 100 --check-rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "gpu"


def run(device: str, rounds: int) -> dict[str, Any]:
    from fl_common.config import load_config
    from fl_server.simulation import Simulation

    cfg = load_config(ROOT / "configs" / "reference_speed.yaml", [f"num_rounds={rounds}", f"device={device}", "workers=0"])
    start = time.perf_counter()
    with Simulation(cfg, progress=False) as sim:
        ready = time.perf_counter() - start
        history = sim.train()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    seconds = [r.seconds for r in history]
    return {"device": device, "rounds": len(history), "wall_seconds": wall, "startup_seconds": ready,
            "rounds_seconds": sum(seconds), "round_seconds_median": statistics.median(seconds),
            "round_seconds": seconds, "evaluated": [(r.round, r.test_accuracy, r.test_loss) for r in history
                                                     if r.test_accuracy is not None]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--check-rounds", type=int, default=5, help="rounds also run on the CPU to compare (0: skip)")
    args = ap.parse_args()
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                              "torch": torch.__version__, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    result["run"] = run(args.device, args.rounds)
    r = result["run"]
    print(f"{args.device}: {r['rounds']} rounds in {r['wall_seconds']:.1f} s (rounds {r['rounds_seconds']:.1f} s, "
          f"median {r['round_seconds_median']:.3f} s/round, start-up {r['startup_seconds']:.1f} s)", flush=True)
    if args.check_rounds:
        gpu = run(args.device, args.check_rounds)
        cpu = run("cpu", args.check_rounds)
        diffs = [(g[0], abs(g[1] - c[1]), abs(g[2] - c[2])) for g, c in zip(gpu["evaluated"], cpu["evaluated"], strict=True)]
        result["cpu_check"] = {"rounds": args.check_rounds, "gpu": gpu["evaluated"], "cpu": cpu["evaluated"],
                               "abs_differences": diffs, "cpu_round_seconds_median": cpu["round_seconds_median"]}
        print(f"CPU check over {args.check_rounds} rounds: |accuracy difference| <= {max(d[1] for d in diffs):.4f}, "
              f"|loss difference| <= {max(d[2] for d in diffs):.5f}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"reference_{args.device.replace(':', '')}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
