"""Benchmark: one DP-SGD step with the hook path (ghost clipping) vs torch.func vs Opacus.

Why it is kept: :mod:`fl_common.privacy.dpsgd` chose its default per-sample path on the strength
of this measurement; anyone can rerun it on their hardware with
``python benchmarks/bench_per_sample.py`` (batches 32 and 128 by default). It lives here, not in
:mod:`fl_common.privacy`, because it drives the trainer, and the privacy package must not import
training code.
Model: the McMahan et al. 2017 MNIST CNN (conv5x5 32, pool, conv5x5 64, pool, fc 512,
fc 10; 1,663,370 parameters) on 1x28x28 inputs. Reports median seconds over ``repeats``
interleaved timed runs after warm-up, for a full step (per-sample norms, clip, sum, noise,
SGD update) of each variant, a plain non-private SGD step as the floor, and the ratios to the
hook path. Opacus is imported only here and only if installed.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fl_common.data.datasets import load_dataset
from fl_common.models.registry import create_model
from fl_common.privacy import client_dp
from fl_common.privacy.dpsgd import dp_sgd_gradients
from fl_common.protocol import TrainInstructions
from fl_common.training import LocalTrainer


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
    """Median seconds per full DP-SGD step (clip, sum, noise, SGD update) for each variant present.

    ``plain_step_s`` is an ordinary non-private SGD step on the same batch (the floor);
    ``ghost_step_s`` the hook path of :mod:`fl_common.privacy.ghost`, ``func_step_s`` the torch.func reference
    (both through :func:`dp_sgd_gradients`), and, with Opacus installed, ``opacus_step_s``
    (GradSampleModule + DPOptimizer) and ``opacus_ghost_step_s`` (Opacus' own ghost clipping,
    two backward passes). Ratios are ``<variant>/ghost``.
    """
    torch.manual_seed(seed)
    x = torch.randn(batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator(device=device).manual_seed(seed)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def dp_step(method: str) -> Callable[[], object]:
        model = mcmahan_cnn().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            stats = dp_sgd_gradients(model, loss_fn, x, y, 1.0, 1.0, gen, float(batch_size), method=method)  # type: ignore[arg-type]
            assert stats.method == method
            opt.step()
            sync()

        return step

    plain_model = mcmahan_cnn().to(device)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01)

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        loss_fn(plain_model(x), y).backward()
        plain_opt.step()
        sync()

    variants: dict[str, Callable[[], object]] = {
        "plain_step_s": plain_step, "ghost_step_s": dp_step("ghost"), "func_step_s": dp_step("func"),
    }
    try:
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    except ImportError:
        pass
    else:
        omodel = GradSampleModule(mcmahan_cnn().to(device), loss_reduction="mean")
        dp_opt = DPOptimizer(
            torch.optim.SGD(omodel.parameters(), lr=0.01),
            noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size, loss_reduction="mean",
        )

        def opacus_step() -> None:
            dp_opt.zero_grad(set_to_none=True)
            loss_fn(omodel(x), y).backward()
            dp_opt.step()
            sync()

        gmodel = GradSampleModuleFastGradientClipping(mcmahan_cnn().to(device), loss_reduction="mean",
                                                      max_grad_norm=1.0, use_ghost_clipping=True)
        g_opt = DPOptimizerFastGradientClipping(
            torch.optim.SGD(gmodel.parameters(), lr=0.01),
            noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size, loss_reduction="mean",
        )
        g_loss = DPLossFastGradientClipping(gmodel, g_opt, nn.CrossEntropyLoss(), loss_reduction="mean")

        def opacus_ghost_step() -> None:
            g_opt.zero_grad(set_to_none=True)
            g_loss(gmodel(x), y).backward()
            g_opt.step()
            sync()

        variants.update({"opacus_step_s": opacus_step, "opacus_ghost_step_s": opacus_ghost_step})
    results = _interleaved_medians(variants, repeats)
    ghost = results["ghost_step_s"]
    for name in list(results):
        if name != "ghost_step_s":
            results[f"ratio_{name[:-2]}_over_ghost"] = results[name] / ghost
    return results


def run_trainer_round(records: int = 600, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Seconds for one client's round of sample-level DP-SGD through the real ``LocalTrainer``.

    Why: the per-step numbers above leave out the Poisson batching, the optimizer and the
    trainer's bookkeeping; this is what a federated run pays per selected client. The client
    holds the first ``records`` Fashion-MNIST training images (600 = a 100-client IID split),
    trains the project's McMahan CNN for one epoch (batch 32, so q = 32/600 and 19 steps),
    momentum 0.9, σ = 1, C = 1, seeded noise, once with the torch.func path and once with the
    hook path (``dp_sgd_gradients`` patched to force each, restored after). Both draw the same
    batches and noise, so ``delta_max_rel_diff`` (max |Δ_ghost − Δ_func| / max |Δ_func|) shows
    they ran the same mechanism.
    """
    data = load_dataset("fashion_mnist", "train")
    x, y = data.x[:records], data.y[:records]
    trainer = LocalTrainer(create_model("cnn", data.input_shape, data.num_classes, seed=seed), seeded_noise=True)
    start = trainer.vector()
    instr = TrainInstructions(round=1, epochs=1, batch_size=32, learning_rate=0.02, momentum=0.9, seed=seed,
                              dp_sample_level=True, dp_noise_multiplier=1.0, dp_clip=1.0)
    original = client_dp.dp_sgd_gradients
    deltas: dict[str, torch.Tensor] = {}

    def round_with(method: str) -> Callable[[], object]:
        def train() -> None:
            client_dp.dp_sgd_gradients = functools.partial(original, method=method)  # type: ignore[assignment]
            try:
                deltas[method] = trainer.train(start, x, y, instr).delta
            finally:
                client_dp.dp_sgd_gradients = original

        return train

    results = _interleaved_medians(
        {"trainer_round_func_s": round_with("func"), "trainer_round_ghost_s": round_with("ghost")}, repeats, warmup=1)
    results["ratio_func_over_ghost"] = results["trainer_round_func_s"] / results["trainer_round_ghost_s"]
    results["delta_max_rel_diff"] = float((deltas["ghost"] - deltas["func"]).abs().max() / deltas["func"].abs().max())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--trainer-round", action="store_true",
                        help="instead: time one client's DP round through LocalTrainer (600 Fashion-MNIST records)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus' hooks, harmless here
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    if args.trainer_round:
        for key, value in run_trainer_round(repeats=max(1, args.repeats)).items():
            print(f"  {key:36s} {value:.4g}")
        return
    for batch in args.batch_size:
        print(f"batch {batch}:")
        for key, value in run(batch, args.repeats, device=args.device).items():
            print(f"  {key:36s} {value:.4f}")


if __name__ == "__main__":
    main()
