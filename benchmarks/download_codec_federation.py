"""float16 vs float32 model download over a whole federation: test accuracy at equal rounds.

The simulation applies ``download_codec`` as the REST server does (fl_server/simulation/runner.py
``downloaded``): every client trains from the model rounded to float16 and its delta is taken against that
start; the server keeps its model in float32. Both runs have the same seed, so the same clients, data and
batches: the only difference is the rounding of each round's starting point.

    PYTHONPATH=$PWD python benchmarks/download_codec_federation.py [--rounds 10]
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
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=10)
    args = ap.parse_args()
    base = {**DEMO_DEFAULTS, "num_clients": args.clients, "num_rounds": args.rounds, "differential_privacy": False,
            "secure_aggregation": False, "workers": 2, "seed": 7}
    runs: dict[str, dict] = {}
    for codec in ("float32", "float16"):
        t0 = time.perf_counter()
        with Simulation({**base, "download_codec": codec}, progress=False) as sim:
            history = sim.train()
        runs[codec] = {"accuracy": [r.test_accuracy for r in history], "loss": [r.test_loss for r in history],
                       "wall_s": round(time.perf_counter() - t0, 1)}
        print(codec, runs[codec], flush=True)
    f32, f16 = runs["float32"]["accuracy"], runs["float16"]["accuracy"]
    report = {"config": {k: base[k] for k in ("model_type", "num_clients", "samples_per_client", "num_rounds", "codec",
                                               "learning_rate", "local_epochs", "max_test_samples", "seed")},
              "runs": runs, "final_accuracy_difference": f16[-1] - f32[-1],
              "max_abs_accuracy_difference": max(abs(a - b) for a, b in zip(f16, f32, strict=True)),
              "load_average": list(os.getloadavg()), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    DEST.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
