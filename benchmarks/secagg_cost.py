"""What secure aggregation costs: client and server CPU time and bytes per client, per phase.

Why these numbers: SecAgg's client cost is one PRG expansion of the update per neighbour plus
the self mask (k + 1 expansions), a few X25519 agreements and Shamir shares; the server's is the
sum plus, at unmasking, one expansion per survivor and one per (dropped, surviving neighbour)
pair. The SecAgg+ graph keeps k logarithmic, so per-client cost stops growing with n. Bytes per
value follow from the field width (clip, precision, clients per round).

Protocol measurements run the real client and server state machines in this process, with
every message through its byte encoding, on a random update of the given size (the masks make
the content irrelevant to the cost). "plain" is what the server does without secure aggregation:
receive float32 and add it to a float64 running sum. CPU times are ``time.process_time`` (this
process only; the machine is shared, so read them as medians of one run, not as constants).
``--simulation`` also times two rounds of the real simulation (cnn, 10 clients) with and without
secure aggregation, in process (the clients' SecAgg work runs serially there; in a deployment it
runs on the clients, in parallel).

    python benchmarks/secagg_cost.py [--cases 10x100000,50x100000,100x100000,10x1663370] [--simulation/--no-simulation]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fl_common.secagg import (
    AdvertiseKeys,
    MaskedInput,
    PlainInput,
    RosterMessage,
    SecAggClient,
    SecAggServer,
    ShareBundle,
    ShareKeys,
    SigningIdentity,
    UnmaskRequest,
    UnmaskResponse,
)
from fl_common.secagg.planning import plan_params

CNN_PARAMETERS = 1_663_370
PHASES = ("advertise_keys", "share_keys", "masked_input", "unmask")


def _timed(acc: dict[str, float], key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    t0 = time.process_time()
    out = fn(*args, **kwargs)
    acc[key] = acc.get(key, 0.0) + time.process_time() - t0
    return out


def protocol_case(n: int, d: int, dropout: float, seed: int = 0) -> dict[str, Any]:
    """One full round over n clients of a d-value update; ``dropout``: fraction that goes silent after
    sharing keys (the expensive case for the server: their pairwise masks must be rebuilt)."""
    rng = np.random.default_rng(seed)
    params = plan_params(round_number=1, client_ids=[f"c{i}" for i in range(n)], vector_length=d, clip=10.0, scale_bits=16,
                         weighted=True, weight_bound=600, with_loss=True)
    ids = {i: SigningIdentity.generate_ed25519() for i in params.indices}
    server_cpu: dict[str, float] = {}
    client_cpu: dict[str, float] = {}
    wall0 = time.perf_counter()
    server = _timed(server_cpu, "setup", SecAggServer, params, {i: ids[i].verifier() for i in params.indices}, now=0.0)
    clients = {i: SecAggClient(params, i, ids[i], rng=np.random.default_rng(i)) for i in params.indices}
    dropped = set(rng.choice(np.arange(1, n + 1), size=round(dropout * n), replace=False).tolist()) if dropout else set()
    # updates of L2 norm ~1 (well inside the clip of 10, so the error below is the fixed point's alone)
    updates = {i: PlainInput(rng.normal(0, 1 / math.sqrt(d), d), weight=int(rng.integers(100, 601)), loss=1.0)
               for i in params.indices}

    for i, c in clients.items():
        _timed(server_cpu, "advertise_keys", server.params_for, i)
        msg = _timed(client_cpu, "advertise_keys", c.advertise)
        _timed(server_cpu, "advertise_keys", server.receive_advertise, AdvertiseKeys.from_bytes(msg.to_bytes()), 1.0)
    for i in server.u1:
        roster = RosterMessage.from_bytes(_timed(server_cpu, "share_keys", server.roster_for, i).to_bytes())
        msg = _timed(client_cpu, "share_keys", clients[i].share_keys, roster)
        _timed(server_cpu, "share_keys", server.receive_share_keys, ShareKeys.from_bytes(msg.to_bytes()), 2.0)
    for i in server.u2:
        if i in dropped:
            continue
        bundle = ShareBundle.from_bytes(_timed(server_cpu, "masked_input", server.bundle_for, i).to_bytes())
        msg = _timed(client_cpu, "masked_input", clients[i].masked_input, bundle, updates[i])
        _timed(server_cpu, "masked_input", server.receive_masked_input, MaskedInput.from_bytes(msg.to_bytes()), 3.0)
    if server.phase.value == "masked_input":
        _timed(server_cpu, "masked_input", server.close_phase, 3.0)
    for i in server.u3:
        request = UnmaskRequest.from_bytes(_timed(server_cpu, "unmask", server.unmask_request_for, i).to_bytes())
        msg = _timed(client_cpu, "unmask", clients[i].unmask, request)
        _timed(server_cpu, "unmask", server.receive_unmask, UnmaskResponse.from_bytes(msg.to_bytes()), 4.0)
    if server.phase.value == "unmask":
        _timed(server_cpu, "unmask", server.close_phase, 4.0)  # reconstruction + mask removal + decoding
    wall = time.perf_counter() - wall0
    result = server.result()
    want = sum(updates[i].delta * updates[i].weight / 600 for i in result.summed)
    err = float(np.max(np.abs(result.sums.delta - want)))
    active = {p: len(server.bytes_in[p]) for p in PHASES}
    per_client = {p: client_cpu.get(p, 0.0) / max(1, active[p]) for p in PHASES}

    # plain: the server receives float32 and adds it to a float64 running sum
    t0 = time.process_time()
    acc = np.zeros(d)
    for i in result.summed:
        payload = updates[i].delta.astype(np.float32).tobytes()
        acc += np.frombuffer(payload, dtype=np.float32) * updates[i].weight
    plain_server = time.process_time() - t0

    return {
        "clients": n, "values": d, "dropped_before_masked_input": len(dropped), "summed": len(result.summed),
        "degree": min(params.degree, n - 1), "complete_graph": params.degree >= n - 1, "threshold": params.threshold,
        "modulus_bits": params.modulus_bits, "bytes_per_value": params.modulus_bits / 8,
        "client_cpu_seconds_per_client": {**per_client, "total": sum(per_client.values())},
        "server_cpu_seconds": {p: server_cpu.get(p, 0.0) for p in PHASES} | {"total": sum(server_cpu.values())},
        "bytes_per_client": server.bytes_per_client(),
        "bytes_up_per_client_total": sum(v["up"] for v in server.bytes_per_client().values()),
        "wall_seconds_all_clients_serial": wall,
        "max_abs_error_of_weighted_sum": err,
        "plain": {"bytes_up_per_client": 4 * d, "server_cpu_seconds": plain_server, "client_cpu_seconds_per_client": 0.0},
    }


def simulation_rounds(rounds: int = 2) -> dict[str, Any]:
    """Round wall time of the real simulation (cnn, Fashion-MNIST subset, 10 clients per round)."""
    from fl_server.simulation import Simulation

    base = {"dataset": "fashion_mnist", "model_type": "cnn", "num_clients": 20, "client_selection_ratio": 0.5,
            "num_rounds": rounds, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.02, "max_train_samples": 6000,
            "max_test_samples": 500, "evaluation_frequency": rounds, "differential_privacy": False, "compression": False,
            "seed": 0}
    out: dict[str, Any] = {"config": base}
    for name in ("plain", "secagg", "plain", "secagg"):  # ABAB: the machine's drift hits both
        with Simulation({**base, "secure_aggregation": name == "secagg"}, progress=False) as sim:
            history = sim.train()
            entry = out.setdefault(name, {"round_seconds": [], "accuracy": [], "bytes_per_round": []})
            entry["round_seconds"] += [r.seconds for r in history]
            entry["accuracy"].append(history[-1].test_accuracy)
            entry["bytes_per_round"].append(history[-1].bytes)
            if name == "secagg":
                entry["summary"] = sim.summary()["secure_aggregation"]
    for name in ("plain", "secagg"):
        out[name]["median_round_seconds"] = statistics.median(out[name]["round_seconds"])
    out["extra_round_time"] = out["secagg"]["median_round_seconds"] / out["plain"]["median_round_seconds"] - 1.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=f"10x100000,50x100000,100x100000,10x{CNN_PARAMETERS}",
                        help="comma-separated CLIENTSxVALUES")
    parser.add_argument("--dropout", type=float, default=0.1, help="also run each case with this fraction dropping out")
    parser.add_argument("--simulation", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "secagg_cost.json"))
    args = parser.parse_args()

    results: dict[str, Any] = {"measured": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
                               "machine": platform.platform(), "cases": []}
    for case in args.cases.split(","):
        n, d = (int(x) for x in case.lower().split("x"))
        for dropout in (0.0, args.dropout) if args.dropout else (0.0,):
            r = protocol_case(n, d, dropout)
            results["cases"].append(r)
            c, s = r["client_cpu_seconds_per_client"], r["server_cpu_seconds"]
            print(f"n={n:4d} d={d:8d} dropped={r['dropped_before_masked_input']:3d} k={r['degree']:3d} t={r['threshold']:3d} "
                  f"b={r['modulus_bits']}: client {c['total'] * 1e3:8.1f} ms (mask {c['masked_input'] * 1e3:7.1f}), "
                  f"server {s['total'] * 1e3:8.1f} ms (unmask {s['unmask'] * 1e3:7.1f}; "
                  f"plain {r['plain']['server_cpu_seconds'] * 1e3:6.1f}), "
                  f"up {r['bytes_up_per_client_total'] / 1e3:9.1f} kB/client (plain {4 * d / 1e3:9.1f}), "
                  f"err {r['max_abs_error_of_weighted_sum']:.2e}", flush=True)
    if args.simulation:
        sim = simulation_rounds()
        results["simulation_cnn_10_clients"] = sim
        print(f"simulation cnn, 10 clients/round: plain {sim['plain']['median_round_seconds']:.2f} s/round, secagg "
              f"{sim['secagg']['median_round_seconds']:.2f} s/round ({100 * sim['extra_round_time']:+.1f} %)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else o))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
