"""The server's two DP granularities behind one interface: the factory, the settings it passes, and
checkpoints written before the split (by the one-class ``PrivacyEngine``) loading unchanged."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from fl_common.config import ConfigError, config_from_dict
from fl_common.privacy import make_accountant
from fl_common.privacy.client_dp import sample_level_schedule
from fl_server.privacy import ClientLevelDP, DPSettings, SampleLevelDP, ServerDP, make_server_dp

DELTA = 1e-5
BASE = {"secure_aggregation": False, "differential_privacy": True, "dp_delta": DELTA, "dp_accountant": "rdp"}
CLIENT = {**BASE, "dp_mode": "client", "num_clients": 20, "client_selection_ratio": 0.25, "num_rounds": 10,
          "dp_noise_multiplier": 1.5, "dp_epsilon": 10.0}
SAMPLE = {**BASE, "dp_mode": "sample", "num_clients": 4, "client_selection_ratio": 0.5, "num_rounds": 10, "batch_size": 16,
          "dp_epsilon": 3.0}
SIZES = {0: 40, 1: 300, 2: 90, 3: 1000}

# Written by fl_server/privacy_engine.py (PrivacyEngine, state version 1) before the split, for the two
# configurations above: client level after two rounds of 5 of 20 clients; sample level (per-client
# calibration) after one round in which clients 0 and 3 took part.
OLD_CLIENT_STATE = json.loads(
    '{"version": 1, "mode": "client", "accountant": "rdp", "epsilon_budget": 10.0, "delta": 1e-05, "noise_multiplier": 1.5, '
    '"clip_norm": 1.0, "count_noise_std": 0.0, "ledger": {"format_version": 1, "epsilon_budget": 10.0, "delta": 1e-05, '
    '"accountant": "rdp", "num_records": 20, "rounds": [{"round": 1, "noise_multiplier": 1.5, "sample_rate": 0.25, "steps": 1, '
    '"epsilon": 1.5969793674999142}, {"round": 2, "noise_multiplier": 1.5, "sample_rate": 0.25, "steps": 1, '
    '"epsilon": 1.9726980827955052}]}, "client_records": [], "noise_calibration": "uniform", "sigma_by_size": [], '
    '"round_epsilons": [[1, 1.5969793674999142], [2, 1.9726980827955052]], "stop_reason": null}')
OLD_SAMPLE_STATE = json.loads(
    '{"version": 1, "mode": "sample", "accountant": "rdp", "epsilon_budget": 3.0, "delta": 1e-05, "noise_multiplier": 4.4375, '
    '"clip_norm": 1.0, "count_noise_std": 0.0, "ledger": null, "client_records": [[0, [[1, 4.4375, 0.4, 10]]], '
    '[3, [[1, 1.203125, 0.016, 310]]]], "noise_calibration": "per_client", "sigma_by_size": [[40, 4.4375, 2.986793860936947], '
    '[1000, 1.203125, 2.9937573123968892]], "round_epsilons": [[1, 1.4011986391819578]], "stop_reason": null}')


def _json(state: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(state))  # as a REST store keeps it


def test_the_factory_picks_the_granularity_and_passes_only_the_dp_settings() -> None:
    cfg = config_from_dict({**CLIENT, "dp_noise": "distributed", "secure_aggregation": True, "dp_adaptive_clipping": True,
                            "dp_target_quantile": 0.3})
    dp = make_server_dp(cfg)
    assert isinstance(dp, ClientLevelDP) and dp.mode == "client"
    assert dp.settings == DPSettings.from_config(cfg)
    s = dp.settings
    assert (s.noise, s.adaptive_clipping, s.target_quantile) == ("distributed", True, 0.3)
    assert (s.clients_per_round, s.noise_multiplier, s.clip_norm, s.num_clients) == (5, 1.5, 1.0, 20)
    sample = make_server_dp(config_from_dict(SAMPLE), SIZES)
    assert isinstance(sample, SampleLevelDP) and sample.mode == "sample"
    assert sample.settings.batch_size == 16 and sample.settings.client_rounds is None
    with pytest.raises(ValueError, match="differential_privacy: true"):
        make_server_dp(config_from_dict({**SAMPLE, "differential_privacy": False}))
    with pytest.raises(ConfigError, match=r"'dp_mode' has value 'record': allowed 'sample', 'client'"):
        make_server_dp(dataclasses.replace(config_from_dict(SAMPLE), dp_mode="record"), SIZES)  # past the schema
    with pytest.raises(TypeError, match="abstract"):
        ServerDP(DPSettings.from_config(cfg))  # type: ignore[abstract]


def test_a_client_level_checkpoint_from_before_the_split_loads_and_is_written_back_identically() -> None:
    dp = make_server_dp(config_from_dict(CLIENT))
    dp.load_state_dict(_json(OLD_CLIENT_STATE))
    assert dp.epsilon_spent() == make_accountant("rdp", [(1.5, 0.25, 2)]).epsilon(DELTA) == 1.9726980827955052
    assert dp.expected_epsilon == make_accountant("rdp", [(1.5, 0.25, 10)]).epsilon(DELTA)
    assert dp.state_dict() == OLD_CLIENT_STATE and list(dp.state_dict()) == list(OLD_CLIENT_STATE)


def test_a_sample_level_checkpoint_from_before_the_split_loads_and_is_written_back_identically() -> None:
    dp = make_server_dp(config_from_dict(SAMPLE), SIZES)
    dp.load_state_dict(_json(OLD_SAMPLE_STATE))
    assert isinstance(dp, SampleLevelDP) and dp.calibration == "per_client"
    q0, s0 = sample_level_schedule(40, 16, 5)
    q3, s3 = sample_level_schedule(1000, 16, 5)
    eps = dp.client_epsilons()
    assert eps[0] == make_accountant("rdp", [(4.4375, q0, s0)]).epsilon(DELTA)
    assert eps[3] == make_accountant("rdp", [(1.203125, q3, s3)]).epsilon(DELTA) == dp.epsilon_spent() == 1.4011986391819578
    assert eps[1] == eps[2] == 0.0 and dp.noise_multiplier == 4.4375
    assert dp.state_dict() == OLD_SAMPLE_STATE and list(dp.state_dict()) == list(OLD_SAMPLE_STATE)


def test_both_granularities_write_one_checkpoint_format_and_refuse_each_others() -> None:
    client = make_server_dp(config_from_dict(CLIENT))
    sample = make_server_dp(config_from_dict(SAMPLE), SIZES)
    assert list(client.state_dict()) == list(sample.state_dict()) == list(OLD_CLIENT_STATE)
    with pytest.raises(ValueError, match="privacy mode is 'client', the configuration's 'sample'"):
        sample.load_state_dict(_json(OLD_CLIENT_STATE))
    with pytest.raises(ValueError, match="privacy mode is 'sample', the configuration's 'client'"):
        client.load_state_dict(_json(OLD_SAMPLE_STATE))
    with pytest.raises(ValueError, match="has no ledger"):
        client.load_state_dict({**_json(OLD_CLIENT_STATE), "ledger": None})


def test_a_given_sample_level_noise_multiplier_that_cannot_last_the_run_is_said_at_start(caplog) -> None:
    """Client-level DP already said how many rounds fit; sample level said nothing until the run stopped."""
    cfg = config_from_dict({**SAMPLE, "dp_noise_multiplier": 0.9, "num_rounds": 40})
    with caplog.at_level("WARNING", logger="fl_server.privacy"):
        dp = make_server_dp(cfg, SIZES)
    assert isinstance(dp, SampleLevelDP)
    q, steps = sample_level_schedule(40, 16, 1)  # the smallest shard is the worst off at one sigma
    fit = max(r for r in range(dp.planned_rounds + 1)
              if r == 0 or make_accountant("rdp", [(0.9, q, steps * r)]).epsilon(DELTA) <= 3.0)
    assert dp.rounds_within_budget == fit < dp.planned_rounds
    assert f"fits only {fit} of its {dp.planned_rounds} planned rounds" in caplog.text
    assert f"only {fit} of its {dp.planned_rounds} planned rounds" in dp.describe()
    caplog.clear()
    with caplog.at_level("WARNING", logger="fl_server.privacy"):
        roomy = make_server_dp(config_from_dict({**SAMPLE, "dp_noise_multiplier": 50.0, "num_rounds": 40}), SIZES)
    assert roomy.rounds_within_budget == roomy.planned_rounds and "fits only" not in caplog.text
