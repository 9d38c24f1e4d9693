"""The simulation's secure round against its plain round (issue 12: masking now runs in the client workers).

The real simulation, cnn, 10 clients per round, process-pool workers (one per core), plain and secure runs
alternated ABAB so the machine's drift hits both (``secagg_cost.simulation_rounds``).

    PYTHONPATH=$PWD python benchmarks/sim_secure_vs_plain.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from secagg_cost import simulation_rounds  # benchmarks/ is on sys.path when this file runs

DEST = Path(__file__).resolve().parent / "results" / "fast_rounds" / "simulation_secure_vs_plain.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    out = simulation_rounds(args.rounds)
    for name in ("plain", "secagg"):
        out[name].pop("summary", None)
    out.update({"ratio_secure_to_plain": out["secagg"]["median_round_seconds"] / out["plain"]["median_round_seconds"],
                "workers": "default (one per core)", "load_average": list(os.getloadavg()),
                "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    DEST.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("plain", "secagg")}, indent=1))
    print("plain", out["plain"]["round_seconds"], "secagg", out["secagg"]["round_seconds"])


if __name__ == "__main__":
    main()
