"""Plain vs masking (SecAgg+) vs CKKS aggregation, side by side in one invocation: upload bytes per
client, client CPU per client, server CPU and the round's wall time, for the cnn (1,663,370
parameters) at 10 clients per round; plus each method's largest error against the float64 sum.

Every method runs through the real coordinator and its real driver code in this process
(``SecAggSimulation`` / ``CKKSSimulation``, every message through its byte encoding), on synthetic
updates: local training is left out because it costs the same under all three, so the numbers are
the aggregation's own. "plain" is the coordinator fed float32 deltas (4 bytes per value; the int8
codec would send ~1 byte per value, neither masking nor CKKS can use it). CPU is
``time.process_time`` attributed by the drivers (client work of all clients / clients; server work
per round); the wall time is the whole round in one process, so every client's work is serial
here - in a deployment the clients run in parallel and the wall time shrinks by up to their
client CPU x (n - 1). The machine is shared: read medians side by side, not as constants.

    python benchmarks/he_compare.py [--rounds 3] [--clients 10] [--numel 1663370] [--out benchmarks/results/he/he_compare.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fl_common.config import config_from_dict
from fl_common.protocol import ClientUpdate
from fl_common.tensors import spec_of
from fl_server.coordinator import Coordinator, RoundPlan
from fl_server.simulation.ckks import SIMULATION_FEATURES as CKKS_FEATURES
from fl_server.simulation.ckks import CKKSSimulation
from fl_server.simulation.secagg import SIMULATION_FEATURES as MASKING_FEATURES
from fl_server.simulation.secagg import SecAggSimulation

CNN_PARAMETERS = 1_663_370


def _size(cid: int) -> int:
    return 300 + 37 * cid


def _updates(plan: RoundPlan, cids: list[Any], numel: int) -> Iterator[ClientUpdate]:
    for cid in cids:
        g = torch.Generator().manual_seed(1000 * plan.round + int(cid))
        yield ClientUpdate(cid, plan.round, torch.randn(numel, generator=g) * 1e-3, _size(int(cid)), {"train_loss": 0.5})


def _exact_mean(plan: RoundPlan, cids: list[Any], numel: int) -> torch.Tensor:
    total, weight = torch.zeros(numel, dtype=torch.float64), 0.0
    for u in _updates(plan, sorted(cids), numel):
        total += u.delta.double() * u.num_samples
        weight += u.num_samples
    return total / weight


def _coordinator(cfg: Any, numel: int, features: tuple[str, ...], verifier: Any = None) -> Coordinator:
    return Coordinator(cfg, torch.zeros(numel), spec_of({"w": torch.zeros(numel)}),
                       client_sizes={c: _size(c) for c in range(cfg.num_clients)}, driver_features=features,
                       secagg_verifiers=verifier)


def run(method: str, clients: int, rounds: int, numel: int) -> dict[str, Any]:
    base = {"num_clients": clients, "client_selection_ratio": 1.0, "num_rounds": rounds, "differential_privacy": False,
            "compression": False, "seed": 1, "secure_aggregation": method != "plain"}
    if method == "ckks":
        base["secure_aggregation_method"] = "ckks"
    cfg = config_from_dict(base)
    walls, errors = [], []
    if method == "plain":
        coord = _coordinator(cfg, numel, ())
        client_cpu = server_cpu = 0.0
        for _ in range(rounds):
            t0 = time.perf_counter()
            plan = coord.plan_round(list(range(clients)))
            start = coord.global_vector.double().clone()
            for u in _updates(plan, plan.selected, numel):
                c0 = time.process_time()
                wire = u.delta.to(torch.float32).numpy().tobytes()  # what a plain client uploads (float32)
                client_cpu += time.process_time() - c0
                s0 = time.process_time()
                u.delta = torch.frombuffer(bytearray(wire), dtype=torch.float32)
                u.wire_bytes = len(wire)
                coord.submit(u)
                server_cpu += time.process_time() - s0
            s0 = time.process_time()
            coord.close_round()
            server_cpu += time.process_time() - s0
            walls.append(time.perf_counter() - t0)
            errors.append(float((coord.global_vector.double() - start - _exact_mean(plan, plan.selected, numel)).abs().max()))
        return {"method": "plain (float32)", "upload_bytes_per_client": 4 * numel, "client_cpu_s": client_cpu / (rounds * clients),
                "server_cpu_s": server_cpu / rounds, "round_wall_s": statistics.median(walls), "max_error": max(errors)}
    driver: SecAggSimulation | CKKSSimulation
    if method == "masking":
        driver = SecAggSimulation(cfg)
        coord = _coordinator(cfg, numel, MASKING_FEATURES, driver.verifier)
    else:
        driver = CKKSSimulation(cfg)
        coord = _coordinator(cfg, numel, CKKS_FEATURES)
    for _ in range(rounds):
        start = coord.global_vector.double().clone()
        t0 = time.perf_counter()
        _, plan, summed = driver.run_round(coord, {}, lambda p, cids: _updates(p, cids, numel))
        walls.append(time.perf_counter() - t0)
        errors.append(float((coord.global_vector.double() - start - _exact_mean(plan, list(summed), numel)).abs().max()))
    s = driver.summary()
    if method == "masking":
        up = sum(v["up"] for v in s["bytes_per_client_per_phase"].values())
        extra: dict[str, Any] = {"parameters": s["last_round_parameters"]}
    else:
        up = s["upload_bytes_per_client"] + s["public_key_bytes"] / clients  # the decryptor's key, shared out
        extra = {"parameters": s["last_round_parameters"], "ciphertexts_per_client": s["ciphertexts_per_client"],
                 "error_bound_per_slot_of_sum": s["max_error_bound_per_slot"]}
    return {"method": method, "upload_bytes_per_client": up, "client_cpu_s": s["client_cpu_seconds_per_client_round"],
            "server_cpu_s": s["server_cpu_seconds_per_round"], "round_wall_s": statistics.median(walls),
            "max_error": max(errors), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--numel", type=int, default=CNN_PARAMETERS)
    ap.add_argument("--methods", default="plain,masking,ckks")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "he" / "he_compare.json")
    args = ap.parse_args()
    rows = []
    for method in args.methods.split(","):
        row = run(method, args.clients, args.rounds, args.numel)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
           "load_average": list(__import__("os").getloadavg()), "clients": args.clients, "rounds": args.rounds,
           "numel": args.numel, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print("| method | upload per client | client CPU per client | server CPU per round | round wall (serial) | max error vs float64 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['upload_bytes_per_client'] / 1e6:.2f} MB | {r['client_cpu_s']:.3f} s | {r['server_cpu_s']:.3f} s | "
              f"{r['round_wall_s']:.2f} s | {r['max_error']:.2e} |")


if __name__ == "__main__":
    main()
