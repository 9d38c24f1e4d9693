"""The no-framework baseline: FedAvg as a plain sequential PyTorch loop.

It does exactly the work of ``python -m fl_server simulate`` on the same config - same data,
same partitions, same initial model, same clients selected each round, same per-client shuffles -
but with nothing around it: one process, torch's default intra-op threads, a hand-written
training loop and a running weighted mean. The speed benchmark runs it beside the simulation.

    python benchmarks/plain_loop.py --config configs/reference_speed.yaml --rounds 20 --out plain.json
"""

from __future__ import annotations

import argparse
import json
import time

T0 = time.perf_counter()

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from fl_common.config import load_config  # noqa: E402
from fl_common.data import load_dataset  # noqa: E402
from fl_common.data.partition import partition  # noqa: E402
from fl_common.models import model_from_config  # noqa: E402
from fl_common.protocol import derive_seed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    train = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir)
    test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir)
    parts = partition(train.y.numpy(), cfg.num_clients, cfg.partition_method, seed=cfg.seed, alpha=cfg.non_iid_alpha)
    model = model_from_config(cfg, train.input_shape, train.num_classes)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    k = cfg.clients_per_round
    startup = time.time() - psutil.Process().create_time()  # process start -> first round, as for the simulation
    rows = []
    for r in range(1, args.rounds + 1):
        t = time.perf_counter()
        rng = np.random.default_rng(derive_seed(cfg.seed, r, "selection"))
        selected = sorted(rng.choice(cfg.num_clients, size=k, replace=False).tolist())
        acc_state = {name: torch.zeros_like(v, dtype=torch.float64) for name, v in global_state.items()}
        total = 0
        for cid in selected:
            model.load_state_dict(global_state)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
            idx_all = torch.from_numpy(parts[cid].astype(np.int64))
            x, y = train.x[idx_all], train.y[idx_all]
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, r, cid, "train"))
            for _ in range(cfg.local_epochs):
                order = torch.randperm(len(y), generator=gen)
                for b in range(0, len(y), cfg.batch_size):
                    idx = order[b : b + cfg.batch_size]
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    loss.backward()
                    opt.step()
            n = len(y)
            for name, v in model.state_dict().items():
                acc_state[name] += n * (v.double() - global_state[name].double())
            total += n
        global_state = {name: (global_state[name] + (acc_state[name] / total).float()) for name in global_state}
        accuracy = None
        if r % cfg.evaluation_frequency == 0 or r == args.rounds:
            model.load_state_dict(global_state)
            model.eval()
            correct = 0
            with torch.inference_mode():
                for b in range(0, len(test), 1000):
                    correct += int((model(test.x[b : b + 1000]).argmax(1) == test.y[b : b + 1000]).sum())
            accuracy = correct / len(test)
        rows.append({"round": r, "seconds": time.perf_counter() - t, "test_accuracy": accuracy})
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"startup_seconds": startup, "rounds": rows, "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
