"""The DP recipe: applied only under sample-level DP when the user chose no model, never over a key the user set."""

from __future__ import annotations

import logging

import pytest

from fl_common.config import load_config
from fl_common.config.recipes import (
    LARGE_EPSILON_FROM,
    LARGE_EPSILON_RECIPE,
    SMALL_EPSILON_RECIPE,
    apply_dp_recipe,
    dp_recipe,
)


def test_the_recipe_follows_epsilon() -> None:
    assert dp_recipe(1.0) == SMALL_EPSILON_RECIPE and dp_recipe(LARGE_EPSILON_FROM) == LARGE_EPSILON_RECIPE
    assert dp_recipe(3.99)["model_type"] == dp_recipe(8.0)["model_type"] == "scatter_linear"  # measured best at 1 and 8
    dp_recipe(1.0)["batch_size"] = 1  # a copy: the module's recipe is not changed
    assert SMALL_EPSILON_RECIPE["batch_size"] == 256


@pytest.mark.parametrize(("values", "given", "applies"), [
    ({}, set(), True),                                                       # schema defaults: DP on, sample level
    ({"differential_privacy": False}, {"differential_privacy"}, False),
    ({"dp_mode": "client"}, {"dp_mode"}, False),
    ({"model_type": "mlp"}, {"model_type"}, False),                           # the user chose the model
    ({"model_type": "mlp"}, set(), True),                                    # a driver's default model is not a choice
])
def test_when_the_recipe_applies(values: dict, given: set, applies: bool) -> None:
    out, note = apply_dp_recipe(values, given)
    assert (note is not None) is applies
    if applies:
        assert {k: out[k] for k in SMALL_EPSILON_RECIPE} == SMALL_EPSILON_RECIPE and "DP recipe" in note
    else:
        assert out == values


def test_load_config_applies_it_logs_it_and_keeps_what_the_user_set(tmp_path, caplog) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("num_clients: 40\nbatch_size: 16\n")
    with caplog.at_level(logging.INFO, logger="fl_common.config"):
        cfg = load_config(path, ["dp_epsilon=8"])
    assert cfg.model_type == "scatter_linear" and cfg.learning_rate == 1.0 and cfg.lr_schedule == "cosine"  # lr: README 9.1
    assert cfg.batch_size == 16  # the file's value wins
    message = next(r.getMessage() for r in caplog.records if "DP recipe" in r.getMessage())
    assert "kept your batch_size" in message and "epsilon >= 4" in message
    plain = load_config(path, ["differential_privacy=false", "secure_aggregation=false"])
    assert plain.model_type == "cnn" and plain.learning_rate == 0.01  # schema defaults without DP
