"""float16 vs float32 model download over a whole federation: test accuracy at equal rounds.

The simulation applies ``download_codec`` as the REST server does (fl_server/simulation/runner.py
``downloaded``): every client trains from the model rounded to float16 and its delta is taken against that
start; the server keeps its model in float32. Both runs have the same seed, so the same clients, data and
batches: the only difference is the rounding of each round's starting point.

    PYTHONPATH=$PWD python benchmarks/download_codec_federation.py [--rounds 8] [--seeds 7 8 9]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from fl_server.rest.demo import DEMO_DEFAULTS
from fl_server.simulation import Simulation

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "benchmarks" / "results" / "fast_rounds" / "download_codec_federation.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[7], help="one pair of runs per seed (selection, data, batches)")
    args = ap.parse_args()
    base = {**DEMO_DEFAULTS, "num_clients": args.clients, "num_rounds": args.rounds, "differential_privacy": False,
            "secure_aggregation": False, "workers": 2}
    runs: dict[str, dict[str, dict]] = {}
    for seed in args.seeds:
        for codec in ("float32", "float16"):
            t0 = time.perf_counter()
            with Simulation({**base, "seed": seed, "download_codec": codec}, progress=False) as sim:
                history = sim.train()
            runs.setdefault(str(seed), {})[codec] = {"accuracy": [r.test_accuracy for r in history],
                                                     "loss": [r.test_loss for r in history],
                                                     "wall_s": round(time.perf_counter() - t0, 1)}
            print(seed, codec, runs[str(seed)][codec], flush=True)
    final = {seed: r["float16"]["accuracy"][-1] - r["float32"]["accuracy"][-1] for seed, r in runs.items()}
    report = {"config": {k: base[k] for k in ("model_type", "num_clients", "samples_per_client", "num_rounds", "codec",
                                               "learning_rate", "local_epochs", "max_test_samples")},
              "seeds": args.seeds, "runs": runs, "final_accuracy_difference_per_seed": final,
              "mean_final_accuracy_difference": sum(final.values()) / len(final),
              "final_accuracy_float32": {s: r["float32"]["accuracy"][-1] for s, r in runs.items()},
              "final_accuracy_float16": {s: r["float16"]["accuracy"][-1] for s, r in runs.items()},
              "load_average": list(os.getloadavg()), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    DEST.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
