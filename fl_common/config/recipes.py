"""Training settings that DP-SGD needs, applied when privacy is on and the user left them open.

Why: DP-SGD clips every per-sample gradient, which shrinks each step about tenfold at C = 1
(benchmarks/results/privacy_search/README.md, section 1: 88-92 % of per-sample gradients are
clipped), so the non-private defaults (lr 0.01, no momentum) barely train under DP. The privacy
search measured, on the reference experiment (Fashion-MNIST, 100 clients, Dirichlet(0.5), 10 per
round, 100 rounds, sample-level, per-client calibration, PRV):

* epsilon about 1: ``scatter_linear`` (a fixed wavelet scattering transform + GroupNorm + one linear
  layer: Tramer and Boneh 2021's handcrafted features, fl_common/models/scattering.py), batch 256,
  lr 0.4 cosine, client momentum 0.9, C = 1: 80.46 % (before it, McMahan's ``cnn`` at batch 64,
  lr 0.05: 73.50 %; the tempered-sigmoid CNN at its best setting, batch 128 lr 0.5: 66.99 %);
* epsilon 8: ``scatter_linear`` with lr 1.0 (the schema's cap) instead of 0.4: 85.54 % (lr 0.4: 84.52 %;
  README section 9.1), ahead of the tempered-sigmoid ``tanh_cnn`` (Papernot et al. 2021) with
  hidden_size 128, batch 128, lr 1.0: 79.53 % (the ``cnn`` at lr 0.05: 74.23 %).

So from epsilon 4 the same model and batch with the larger step (with little noise lr x C must make up
for what clipping takes; measured at epsilon 8, not yet at 4). The recipe fills only the keys the user did not set (a key
given in a file or with --set always wins) and is applied only when the user did not choose the
model: a chosen model means the user is tuning, and a silent change of lr would surprise them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from fl_common.config.schema import FLConfig

__all__ = ["RECIPE_KEYS", "SMALL_EPSILON_RECIPE", "LARGE_EPSILON_RECIPE", "LARGE_EPSILON_FROM", "apply_dp_recipe", "dp_recipe"]

SMALL_EPSILON_RECIPE: dict[str, Any] = {
    "model_type": "scatter_linear", "batch_size": 256, "learning_rate": 0.4, "momentum": 0.9, "lr_schedule": "cosine",
    "clip_grad_norm": 1.0,
}
#: measured at epsilon 8: scatter_linear lr 1.0 85.54 %, with the small-epsilon lr 0.4 84.52 %, tanh_cnn h128 79.53 %
LARGE_EPSILON_RECIPE: dict[str, Any] = {**SMALL_EPSILON_RECIPE, "learning_rate": 1.0}
#: from this epsilon on, the large-epsilon recipe
LARGE_EPSILON_FROM = 4.0
RECIPE_KEYS = tuple(sorted(set(SMALL_EPSILON_RECIPE) | set(LARGE_EPSILON_RECIPE)))


def dp_recipe(epsilon: float) -> dict[str, Any]:
    """The measured best settings for sample-level DP-SGD at ``epsilon`` (a copy)."""
    return dict(LARGE_EPSILON_RECIPE if epsilon >= LARGE_EPSILON_FROM else SMALL_EPSILON_RECIPE)


def _default(name: str) -> Any:
    return FLConfig.__dataclass_fields__[name].default


def apply_dp_recipe(values: Mapping[str, Any], given: Collection[str], *, recipe: Mapping[str, Any] | None = None,
                    source: str = "the DP recipe measured best at epsilon {band} (benchmarks/results/privacy_search)",
                    ) -> tuple[dict[str, Any], str | None]:
    """``values`` with the DP recipe filled in where it applies, and a sentence for the log (or None).

    ``values`` are the merged settings so far (a driver's embedded defaults included); ``given`` the
    keys the user set. Applies when differential privacy is on at sample level and the user did not
    choose ``model_type``. ``recipe`` replaces the epsilon-chosen one where a driver measured its own
    for its run length (the demo's five rounds: fl_server/rest/demo.py), ``source`` names it in the log."""
    out = dict(values)
    dp_on = out.get("differential_privacy", _default("differential_privacy")) is True
    mode = out.get("dp_mode", _default("dp_mode"))
    if not dp_on or mode != "sample" or "model_type" in given:
        return out, None
    epsilon = out.get("dp_epsilon", _default("dp_epsilon"))
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        return out, None  # validation refuses it later with its own message
    chosen = dict(recipe) if recipe is not None else dp_recipe(float(epsilon))
    applied = {k: v for k, v in chosen.items() if k not in given}
    if not applied:
        return out, None
    out.update(applied)
    kept = sorted(k for k in chosen if k in given)
    settings = ", ".join(f"{k}={v}" for k, v in applied.items())
    band = f"{'>= ' if float(epsilon) >= LARGE_EPSILON_FROM else '< '}{LARGE_EPSILON_FROM:g}"
    note = (f"differential privacy is on and no model was chosen: using {source.format(band=band)}: {settings}"
            + (f"; kept your {', '.join(kept)}" if kept else "")
            + "; set model_type to choose the model and settings yourself")
    return out, note
