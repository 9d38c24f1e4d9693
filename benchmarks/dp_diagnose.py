"""Where does sample-level DP-SGD lose its accuracy? Clipping, noise, momentum and calibration, measured apart.

The privacy grid (results/privacy/) lost 12-14 points at every epsilon from 2 to 8, so the loss is
not (only) privacy noise. This script replays the reference experiment's local training
(Fashion-MNIST, 100 clients, Dirichlet(0.5) seed 0, 10 per round, 1 local epoch, B 64, lr 0.05,
momentum 0.9, C 1) for a few rounds in several *arms* that share the selection and the data, and
records per DP-SGD step what the simulation cannot report (the norms are not private, which is why
the trainer never sends them):

* ``nonprivate``: the project's ``LocalTrainer`` without DP (shuffled batches of B);
* ``clip``: DP-SGD's Poisson batches and per-sample clipping at C, **noise multiplier 0** (clipping alone);
* ``eps8``, ``eps1`` ...: clipping plus the noise each client gets under per-client calibration at
  that epsilon (the sigma per shard size the privacy grid's runs calibrated with PRV, read from
  ``results/privacy/sample_eps<E>_cosine/summary.json``: same partition, B, rounds planned).

Per step, at the weights the arm has reached: the per-sample gradient norms (fraction above C,
quantiles), the *effective step* ||mean of clipped g_i|| / ||mean of raw g_i|| on the same batch and
the cosine between the two (clipping's shrink and bias), the norm of the noise added to the mean
gradient (sigma C sqrt(d) / (q n)) against the clipped signal. Per client update: the noise share
||noise part|| / ||update||, where the noise part is tracked exactly through the momentum buffer
(SGD with momentum mu is linear in the gradients: step s's gradient enters the update with weight
lr (1 - mu^(T-s+1)) / (1 - mu)), and the same for the server's weighted mean over the round's clients.

The DP step is :func:`fl_common.privacy.dp_sgd_gradients` with noise multiplier 0 (the clipped sum /
expected batch, exactly as the trainer computes it) followed by N(0, (sigma C)^2) / (q n) drawn here,
which is the same mechanism with the noise kept apart so that it can be measured.

    OMP_NUM_THREADS=1 nice python benchmarks/dp_diagnose.py --model cnn --rounds 6
    OMP_NUM_THREADS=1 nice python benchmarks/dp_diagnose.py --model tanh_cnn --hidden-size 32 --rounds 6

Writes ``results/privacy_search/diagnosis_<model>.json`` (everything) and ``.md`` (the summary table).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from fl_common.config import load_config
from fl_common.models import count_parameters, model_from_config
from fl_common.privacy import dp_sgd_gradients, poisson_batches
from fl_common.privacy.client_dp import per_example_cross_entropy, sample_level_schedule
from fl_common.protocol import TrainInstructions
from fl_common.training import LocalTrainer
from fl_server.simulation.runner import client_partitions, load_training_data

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "privacy_search"
PRIVACY_RESULTS = ROOT / "benchmarks" / "results" / "privacy"


def sigma_by_size(epsilon: str) -> dict[int, float]:
    """Per-client sigma (PRV, planned 10 rounds, B 64) of the privacy grid's run at this epsilon."""
    summary = json.loads((PRIVACY_RESULTS / f"sample_eps{epsilon}_cosine" / "summary.json").read_text())
    return {int(n): float(s) for n, s in summary["privacy"]["noise_multiplier_by_size"]}


@dataclass
class ArmStats:
    """What one arm measured; lists hold one entry per step or per client update."""

    name: str
    sigma: dict[int, float] | None  # shard size -> noise multiplier; None: non-private
    clip: float | None  # None: no clipping (non-private)
    momentum: float
    lr: float
    vector: torch.Tensor | None = None
    accuracy: list[float] = field(default_factory=list)
    frac_clipped: list[float] = field(default_factory=list)
    norm_quantiles: list[list[float]] = field(default_factory=list)  # per round: p10, p50, p90, max over samples
    eff_step: list[float] = field(default_factory=list)  # ||clipped mean|| / ||raw mean||
    cosine: list[float] = field(default_factory=list)  # cos(clipped mean, raw mean)
    raw_norm: list[float] = field(default_factory=list)
    clipped_norm: list[float] = field(default_factory=list)
    noise_norm: list[float] = field(default_factory=list)  # ||noise / (q n)|| per step
    update_noise_share: list[tuple[int, float, float]] = field(default_factory=list)  # (n_k, sigma_k, share)
    update_norm: list[float] = field(default_factory=list)
    aggregate_noise_share: list[float] = field(default_factory=list)
    aggregate_norm: list[float] = field(default_factory=list)


def _grads_flat(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params])


def dp_client_round(trainer: LocalTrainer, arm: ArmStats, global_vec: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    batch: int, seed: int, norms_out: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's local DP-SGD round with the noise tracked apart; returns (delta, noise part of delta)."""
    model = trainer.model
    trainer.load_vector(global_vec)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=arm.lr, momentum=arm.momentum)
    n = int(y.shape[0])
    q, steps = sample_level_schedule(n, batch, 1)
    expected = q * n
    sigma = 0.0 if arm.sigma is None else arm.sigma[n]
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    noise_part = torch.zeros(sum(p.numel() for p in params))
    mu = arm.momentum
    for s, idx in enumerate(poisson_batches(n, q, gen, num_batches=steps), start=1):
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        if idx.numel() > 0:
            opt.zero_grad(set_to_none=True)
            (F.cross_entropy(model(xb), yb, reduction="sum") / expected).backward()
            raw = _grads_flat(params)
        else:
            raw = torch.zeros_like(noise_part)
        opt.zero_grad(set_to_none=True)
        stats = dp_sgd_gradients(model, per_example_cross_entropy, xb, yb, arm.clip, 0.0, None, expected)
        clipped = _grads_flat(params)
        if idx.numel() > 0:
            norms_out.append(stats.per_sample_norms.float())
            arm.frac_clipped.append(stats.fraction_clipped)
            rn, cn = float(raw.norm()), float(clipped.norm())
            arm.raw_norm.append(rn)
            arm.clipped_norm.append(cn)
            arm.eff_step.append(cn / rn if rn > 0 else float("nan"))
            arm.cosine.append(float(torch.dot(raw, clipped) / (rn * cn)) if rn > 0 and cn > 0 else float("nan"))
        if sigma > 0:
            noise = torch.randn(noise_part.shape, generator=noise_gen) * (sigma * arm.clip / expected)
            arm.noise_norm.append(float(noise.norm()))
            offset = 0
            for p in params:
                p.grad.add_(noise[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
            # weight of step s's gradient in the final displacement: lr (1 - mu^(T-s+1)) / (1 - mu)
            weight = arm.lr * (1 - mu ** (steps - s + 1)) / (1 - mu)  # 1 x lr for plain SGD (mu = 0)
            noise_part -= weight * noise
        opt.step()
    delta = trainer.vector() - global_vec
    # the noise lives on the trainable parameters only; place it in the state vector's layout
    noise_full = torch.zeros_like(delta)
    if sigma > 0:
        noise_full = _params_to_state(model, noise_part, delta.numel())
    return delta, noise_full


def _params_to_state(model: torch.nn.Module, param_vec: torch.Tensor, numel: int) -> torch.Tensor:
    """Scatter a vector over the trainable parameters into the state_dict's flat layout."""
    out = torch.zeros(numel)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    offset_state = 0
    offset_param = 0
    for name, tensor in model.state_dict().items():
        size = tensor.numel()
        if name in names:
            out[offset_state: offset_state + size] = param_vec[offset_param: offset_param + size]
            offset_param += size
        offset_state += size
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    overrides = {"model_type": args.model, "batch_size": args.batch, "learning_rate": args.lr, "momentum": args.momentum,
                 "num_rounds": args.rounds}
    if args.hidden_size:
        overrides["hidden_size"] = args.hidden_size
    cfg = load_config(ROOT / "configs" / "fmnist_privacy_sweep.yaml", overrides)
    train, test = load_training_data(cfg)
    parts = client_partitions(cfg, train)
    model = model_from_config(cfg, train.input_shape, train.num_classes)
    d = count_parameters(model)
    trainer = LocalTrainer(model)
    init = trainer.vector()
    test_x, test_y = test.x[: args.test_samples], test.y[: args.test_samples]
    arms = [ArmStats("nonprivate", None, None, args.momentum, args.lr), ArmStats("clip", None, args.clip, args.momentum, args.lr)]
    for eps in args.epsilons:
        arms.append(ArmStats(f"eps{eps}", sigma_by_size(eps), args.clip, args.momentum, args.lr))
    if args.no_momentum_arm:
        eps = args.no_momentum_arm
        arms.append(ArmStats(f"eps{eps}_mom0_lr{args.lr * args.no_momentum_lr_factor:g}", sigma_by_size(eps), args.clip,
                             0.0, args.lr * args.no_momentum_lr_factor))
    for arm in arms:
        arm.vector = init.clone()
    rng = np.random.default_rng(args.seed)
    per_round = cfg.clients_per_round
    t0 = time.time()
    for rnd in range(1, args.rounds + 1):
        chosen = sorted(rng.choice(len(parts), size=per_round, replace=False).tolist())
        for arm in arms:
            deltas, noises, weights = [], [], []
            norms: list[torch.Tensor] = []
            for cid in chosen:
                idx = torch.as_tensor(parts[cid])
                x, y = train.x.index_select(0, idx), train.y.index_select(0, idx)
                seed = args.seed * 1_000_003 + rnd * 1009 + cid
                if arm.clip is None:
                    instr = TrainInstructions(round=rnd, epochs=1, batch_size=args.batch, learning_rate=arm.lr,
                                              momentum=arm.momentum, seed=seed)
                    delta = trainer.train(arm.vector, x, y, instr, cid).delta
                    noise = torch.zeros_like(delta)
                else:
                    delta, noise = dp_client_round(trainer, arm, arm.vector, x, y, args.batch, seed, norms)
                    if arm.sigma is not None:
                        arm.update_noise_share.append((int(y.shape[0]), arm.sigma[int(y.shape[0])],
                                                       float(noise.norm() / delta.norm())))
                arm.update_norm.append(float(delta.norm()))
                deltas.append(delta)
                noises.append(noise)
                weights.append(float(y.shape[0]))
            w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
            agg = sum(float(wi) * di for wi, di in zip(w, deltas, strict=False))
            agg_noise = sum(float(wi) * ni for wi, ni in zip(w, noises, strict=False))
            arm.aggregate_norm.append(float(agg.norm()))
            if arm.sigma is not None:
                arm.aggregate_noise_share.append(float(agg_noise.norm() / agg.norm()))
            if norms:
                allnorms = torch.cat(norms)
                arm.norm_quantiles.append([float(torch.quantile(allnorms, p)) for p in (0.1, 0.5, 0.9)] + [float(allnorms.max())])
            arm.vector = arm.vector + agg
            acc = trainer.evaluate(arm.vector, test_x, test_y).accuracy
            arm.accuracy.append(acc)
            print(f"[{time.time() - t0:6.0f}s] round {rnd} {arm.name}: acc {100 * acc:.2f} %"
                  + (f", clipped {100 * statistics.mean(arm.frac_clipped[-50:]):.0f} %, eff step "
                     f"{statistics.median(arm.eff_step[-50:]):.3f}" if arm.eff_step else "")
                  + (f", noise share agg {arm.aggregate_noise_share[-1]:.2f}" if arm.aggregate_noise_share else ""), flush=True)
    return {"model": args.model, "hidden_size": args.hidden_size or None, "parameters": d, "rounds": args.rounds,
            "batch": args.batch, "lr": args.lr, "momentum": args.momentum, "clip": args.clip,
            "test_samples": int(test_y.shape[0]), "seconds": time.time() - t0,
            "arms": [{k: v for k, v in arm.__dict__.items() if k not in ("vector", "sigma")} for arm in arms]}


def _med(xs: list[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    return f"{statistics.median(xs):.3g}" if xs else ""


def write_markdown(result: dict, path: Path) -> None:
    lines = [f"# DP diagnosis: {result['model']} ({result['parameters']:,} parameters)", "",
             (f"Reference setting, {result['rounds']} rounds, B {result['batch']}, lr {result['lr']}, momentum "
             f"{result['momentum']}, C {result['clip']}; accuracy on the first {result['test_samples']} test images. "
             f"Medians over all steps / client updates of all rounds unless marked. Written by benchmarks/dp_diagnose.py."), "",
             ("| arm | acc per round (%) | clipped (mean) | sample norm p10 / p50 / p90 / max (last round) | effective step "
             "‖clip‖ / ‖raw‖ | cos(clip, raw) | ‖noise‖ / ‖clipped mean‖ per step | client update noise share | "
             "aggregate noise share |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in result["arms"]:
        acc = " / ".join(f"{100 * a:.1f}" for a in arm["accuracy"])
        clipped = f"{100 * statistics.mean(arm['frac_clipped']):.1f} %" if arm["frac_clipped"] else ""
        q = " / ".join(f"{v:.2f}" for v in arm["norm_quantiles"][-1]) if arm["norm_quantiles"] else ""
        ratio = ""
        if arm["noise_norm"]:
            ratio = _med([nn / cn for nn, cn in zip(arm["noise_norm"], arm["clipped_norm"], strict=False) if cn > 0])
        share = _med([s for _, _, s in arm["update_noise_share"]])
        lines.append(f"| {arm['name']} | {acc} | {clipped} | {q} | {_med(arm['eff_step'])} | {_med(arm['cosine'])} | {ratio} | "
                     f"{share} | {_med(arm['aggregate_noise_share'])} |")
    lines.append("")
    for arm in result["arms"]:
        if arm["update_noise_share"]:
            small = [s for n, _, s in arm["update_noise_share"] if n < 400]
            large = [s for n, _, s in arm["update_noise_share"] if n >= 800]
            lines.append(f"- {arm['name']}: client update noise share, clients < 400 records {_med(small)} "
                         f"(n = {len(small)}), >= 800 records {_med(large)} (n = {len(large)})")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--hidden-size", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--epsilons", nargs="*", default=["8", "1"], help="arms with per-client sigma of these epsilons")
    ap.add_argument("--no-momentum-arm", default="", help="also an arm at this epsilon without momentum")
    ap.add_argument("--no-momentum-lr-factor", type=float, default=4.0,
                    help="its lr = lr x this (momentum 0.9 over ~10 steps multiplies the step by ~4, not 10)")
    ap.add_argument("--test-samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    result = run(args)
    OUT.mkdir(parents=True, exist_ok=True)
    stem = f"diagnosis_{args.model}{args.tag}"
    (OUT / f"{stem}.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, OUT / f"{stem}.md")
    print((OUT / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
