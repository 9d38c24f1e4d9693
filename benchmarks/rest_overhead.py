"""Protocol overhead of the REST deployment: round wall time minus the slowest client's training.

Runs the real demo stack (gunicorn server + N client daemons on loopback) and reads the server's
SQLite store afterwards: each closed round's start and close times, and the training seconds
every client reported with its update. Evaluation is switched off until the last round so that
the round time is protocol + training only. Also records bytes per update for the codec.

    python benchmarks/rest_overhead.py --clients 10 --rounds 5 --codec int8
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from fl_common.config import config_from_dict
from fl_server.rest.demo import DEMO_DEFAULTS, run_demo

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--samples-per-client", type=int, default=600)
    args = ap.parse_args()
    cfg = config_from_dict({**DEMO_DEFAULTS, "num_clients": args.clients, "num_rounds": args.rounds, "codec": args.codec,
                            "compression": args.codec != "none", "samples_per_client": args.samples_per_client,
                            "evaluation_frequency": args.rounds, "poll_interval": 0.2})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        status = run_demo(cfg, out, args.clients, progress=False)
        wall = time.perf_counter() - t0
        db = sqlite3.connect(out / "server" / "server.db")
        rounds = db.execute("SELECT round_id, round, started_at, closed_at FROM rounds "
                            "WHERE state='closed' ORDER BY round").fetchall()
        rows = []
        for round_id, number, started, closed in rounds:
            ups = db.execute("SELECT metrics, nbytes FROM updates WHERE round_id=?", (round_id,)).fetchall()
            train = [json.loads(m)["seconds"] for m, _ in ups]
            rows.append({"round": number, "wall_s": closed - started, "slowest_training_s": max(train),
                         "overhead_fraction": (closed - started - max(train)) / (closed - started),
                         "updates": len(ups), "bytes_per_update": statistics.median(n for _, n in ups)})
    steady = rows[1:] if len(rows) > 1 else rows  # round 1 includes the clients' start-up (imports, data)
    result = {
        "clients": args.clients, "rounds": args.rounds, "codec": args.codec, "samples_per_client": args.samples_per_client,
        "median_overhead_fraction": statistics.median(r["overhead_fraction"] for r in steady),
        "median_round_s": statistics.median(r["wall_s"] for r in steady),
        "median_slowest_training_s": statistics.median(r["slowest_training_s"] for r in steady),
        "bytes_per_update": statistics.median(r["bytes_per_update"] for r in rows),
        "final_accuracy": status.get("accuracy"), "total_wall_s": wall, "rows": rows,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    dest = ROOT / "benchmarks" / "results" / f"rest_overhead_{args.codec.replace(':', '_').replace('+', '_')}.json"
    dest.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
