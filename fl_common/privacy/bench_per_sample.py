"""Benchmark: per-sample gradients via torch.func vs Opacus' GradSampleModule.

Why it is kept: :mod:`.dpsgd` chose torch.func on the strength of this measurement; anyone
can rerun it on their hardware with ``python -m fl_common.privacy.bench_per_sample``.
Model: the McMahan et al. 2017 MNIST CNN (conv5x5 32, pool, conv5x5 64, pool, fc 512,
fc 10) on 1x28x28 inputs, batch 32. Reports median seconds over ``repeats`` interleaved
timed runs after warm-up, for (a) per-sample gradients only and (b) a full DP-SGD step (clip, sum,
noise, SGD update). Opacus is imported only here and only if installed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .dpsgd import dp_sgd_gradients, per_sample_gradients


def mcmahan_cnn() -> nn.Module:
    """The 2NN/CNN of McMahan et al. 2017 ("Communication-Efficient Learning…"), CNN variant."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, 10),
    )


def _interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per variant, timing the variants in turn within each repetition.

    Why interleaved: on a shared machine the load drifts; timing A's runs then B's runs would
    charge the drift to one of them, while alternating exposes both to the same conditions.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(batch_size: int = 32, repeats: int = 15, seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """Returns median seconds per call for each variant present, and the opacus/torch.func ratios."""
    torch.manual_seed(seed)
    x = torch.randn(batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    model = mcmahan_cnn().to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def func_grads() -> None:
        per_sample_gradients(model, loss_fn, x, y)
        sync()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def func_step() -> None:
        dp_sgd_gradients(model, loss_fn, x, y, 1.0, 1.0, gen, float(batch_size))
        opt.step()
        sync()

    variants: dict[str, Callable[[], object]] = {"torch_func_grads_s": func_grads, "torch_func_step_s": func_step}
    try:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
    except ImportError:
        return _interleaved_medians(variants, repeats)

    omodel = GradSampleModule(mcmahan_cnn().to(device), loss_reduction="mean")

    def opacus_grads() -> None:
        omodel.zero_grad(set_to_none=True)
        loss_fn(omodel(x), y).backward()
        _ = [p.grad_sample for p in omodel.parameters()]
        sync()

    dp_opt = DPOptimizer(
        torch.optim.SGD(omodel.parameters(), lr=0.1),
        noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size, loss_reduction="mean",
    )

    def opacus_step() -> None:
        dp_opt.zero_grad(set_to_none=True)
        loss_fn(omodel(x), y).backward()
        dp_opt.step()
        sync()

    variants.update({"opacus_grads_s": opacus_grads, "opacus_step_s": opacus_step})
    results = _interleaved_medians(variants, repeats)
    results["ratio_grads_opacus_over_func"] = results["opacus_grads_s"] / results["torch_func_grads_s"]
    results["ratio_step_opacus_over_func"] = results["opacus_step_s"] / results["torch_func_step_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for key, value in run(args.batch_size, args.repeats, device=args.device).items():
        print(f"{key:32s} {value:.4f}")


if __name__ == "__main__":
    main()
