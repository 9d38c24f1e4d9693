"""An independent replica of sample-level DP with distributed noise (one DP-SGD step per client per round).

Why it exists: a second implementation of the mechanism in a few lines (closed-form per-sample gradients of the
scatter_linear head, float64, no masking, no framework), to cross-check the pipeline's accuracies
(benchmarks/grids/privacy_search_distributed.yaml) and to run what the pipeline cannot: the same optimisation
without noise (``--nonprivate``, clipping kept), the twin that tells the optimisation's limit from the privacy's.
Each selected client Poisson-samples its records at rate q, clips per-sample gradients to C, sums them and adds
N(0, sigma^2 C^2 / t); the server divides the sum by the expected batch and steps with momentum. sigma comes from
the project's calibration (PRV) for ``--plan`` participations; a client is not selected once it has used them.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/distributed_dp_replica.py --eps 1 --q 0.5 --lr 0.5 --t 8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work" / "privacy_search"


def scattering_features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm'd scattering features of Fashion-MNIST (train x, y, test x, y), as scatter_linear's head sees them."""
    path = WORK / "replica_features.pt"
    if path.is_file():
        d = torch.load(path, weights_only=True)
        return d["xtr"], d["ytr"], d["xte"], d["yte"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dp_search import ScatteringCache

    from fl_common.data.datasets import load_dataset
    from fl_common.models.scattering import Scattering2D

    ScatteringCache(WORK / "scattering_cache.pt").install()
    transform = Scattering2D((28, 28), 2, 8)

    def features(x: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(x), 512):
                s = transform(x[i:i + 512])
                s = s.reshape(s.shape[0], -1, 7, 7)
                out.append(F.group_norm(s, 27).reshape(s.shape[0], -1))
        return torch.cat(out)

    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    d = {"xtr": features(train.x), "ytr": train.y.clone(), "xte": features(test.x), "yte": test.y.clone()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(d, path)
    return d["xtr"], d["ytr"], d["xte"], d["yte"]


def main() -> None:
    from fl_common.data.partition import partition
    from fl_common.privacy.calibration import calibrate_noise_multiplier

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, default=1.0)
    ap.add_argument("--q", type=float, default=0.5, help="Poisson rate of every client's one step")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--plan", type=int, default=0, help="participations sigma is calibrated for (0: the expected)")
    ap.add_argument("--lr", type=float, default=0.5, help="server step (cosine over the rounds)")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--t", type=int, default=8, help="noise shares per sum (min_clients)")
    ap.add_argument("--nonprivate", action="store_true", help="no noise, no budget (clipping kept)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = scattering_features()
    num_clients, per_round = 100, 10
    parts = partition(ytr.numpy(), num_clients, "dirichlet", seed=0, alpha=0.5)
    plan = args.plan or math.ceil(args.rounds * per_round / num_clients)
    sigma = 0.0 if args.nonprivate else calibrate_noise_multiplier(args.eps, 1e-5, args.q, plan, "prv")
    weights = torch.zeros(10, xtr.shape[1] + 1, dtype=torch.float64)
    velocity = torch.zeros_like(weights)
    test_x = torch.cat([xte, torch.ones(len(xte), 1)], 1).double()
    rng = np.random.default_rng(args.seed)
    used = np.zeros(num_clients, int)
    history = []
    for r in range(1, args.rounds + 1):
        eligible = np.flatnonzero(used < plan) if sigma > 0 else np.arange(num_clients)
        selected = rng.choice(eligible, size=min(per_round, len(eligible)), replace=False)
        total = torch.zeros_like(weights)
        expected_batch = 0.0
        for c in selected:
            used[c] += 1
            idx = parts[c][rng.random(len(parts[c])) < args.q]
            xb = torch.cat([xtr[idx], torch.ones(len(idx), 1)], 1).double()
            residual = torch.softmax(xb @ weights.T, 1)
            residual[torch.arange(len(idx)), ytr[idx]] -= 1  # per-sample gradient = residual_i (x) x_i
            scale = torch.clamp(args.clip / (residual.norm(dim=1) * xb.norm(dim=1) + 1e-12), max=1.0)
            total += (residual * scale[:, None]).T @ xb
            if sigma > 0:
                total += torch.randn_like(total) * sigma * args.clip / math.sqrt(args.t)
            expected_batch += args.q * len(parts[c])
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * (r - 1) / args.rounds))
        velocity = args.momentum * velocity + total / expected_batch
        weights = weights - lr * velocity
        if r % 10 == 0 or r == args.rounds:
            accuracy = float(((test_x @ weights.T).argmax(1) == yte).double().mean())
            history.append((r, accuracy))
            print(f"round {r}: test accuracy {accuracy:.4f}", flush=True)
    print(json.dumps({"args": vars(args), "sigma": sigma, "final_accuracy": history[-1][1]}))


if __name__ == "__main__":
    main()
