"""Configuration: seed names and defaults, and every kind of bad input refused with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fl_common.config import ConfigError, FLConfig, config_from_dict, load_config, parse_overrides, replace_config
from fl_common.config.schema import AGGREGATION_METHODS

OFF = {"differential_privacy": False, "secure_aggregation": False}


def test_seed_defaults_are_the_defaults() -> None:
    cfg = FLConfig()
    assert (cfg.num_clients, cfg.num_rounds, cfg.local_epochs, cfg.batch_size) == (100, 100, 5, 32)
    assert (cfg.learning_rate, cfg.client_selection_ratio, cfg.dp_epsilon, cfg.dp_delta) == (0.01, 0.1, 1.0, 1e-5)
    assert cfg.differential_privacy and cfg.secure_aggregation and cfg.compression and cfg.encryption
    assert (cfg.clip_grad_norm, cfg.non_iid_alpha, cfg.hidden_size, cfg.max_retries, cfg.timeout) == (1.0, 0.5, 256, 3, 30.0)
    assert cfg.samples_per_client is None and cfg.num_classes == 10 and cfg.model_type == "cnn"
    assert cfg.clients_per_round == 10


def test_yaml_dict_and_overrides_agree(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("num_clients: 20\nlearning_rate: 0.1\ndifferential_privacy: false\nsecure_aggregation: false\n")
    from_file = load_config(tmp_path / "c.yaml", ["learning_rate=0.2", "data_distribution=non-iid"])
    from_dict = config_from_dict({"num_clients": 20, "learning_rate": 0.2, "data_distribution": "non-iid", **OFF})
    assert from_file == from_dict
    assert from_file.partition_method == "dirichlet"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["num_clent=5"], "unknown config key 'num_clent' (did you mean 'num_clients'?)"),
        (["num_clients=abc"], "'num_clients' has value 'abc': allowed an integer in [1, 10000]"),
        (["num_clients=0"], "'num_clients' has value 0"),
        (["batch_size=4"], "'batch_size' has value 4: allowed an integer in [8, 512]"),
        (["learning_rate=2"], "'learning_rate' has value 2"),
        (["learning_rate=.nan"], "'learning_rate' has value nan"),
        (["dp_epsilon=0"], "'dp_epsilon' has value 0"),
        (["dp_delta=0.5"], "'dp_delta' has value 0.5"),
        (["client_selection_ratio=1.5"], "'client_selection_ratio'"),
        (["aggregation_method=fedmagic"], "one of " + ", ".join(repr(m) for m in AGGREGATION_METHODS)),
        (["data_distribution=weird"], "'data_distribution' has value 'weird'"),
        (["differential_privacy=yes please"], "'differential_privacy' has value 'yes please': allowed true or false"),
        (["local_epochs=1.5"], "'local_epochs' has value 1.5"),
        (["num_rounds=true"], "'num_rounds' has value True"),
        (["model_type=custom"], "'custom_model' must be 'package.module:factory'"),
        (["min_clients=50"], "'min_clients' has value 50"),
        (["novalue"], "--set expects key=value"),
    ],
)
def test_bad_values_are_refused_with_the_key_value_and_rule(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["differential_privacy=false", "secure_aggregation=false", *overrides])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_features_not_built_are_refused_not_skipped() -> None:
    # secure aggregation is built (the simulation runs it; a driver that does not carry the protocol refuses it
    # when it builds its coordinator: tests/server/test_secagg_simulation.py); what is not built is refused here
    assert config_from_dict({"differential_privacy": False}).secure_aggregation
    with pytest.raises(ConfigError, match="asynchronous aggregation of masked updates is not built"):
        config_from_dict({"differential_privacy": False, "training_mode": "async"})
    cfg = config_from_dict({"secure_aggregation": False})  # the seed's default: differential privacy on
    assert cfg.differential_privacy and (cfg.dp_mode, cfg.dp_accountant, cfg.dp_noise) == ("sample", "prv", "central")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        # DP settings that would silently do nothing with differential privacy off
        ({"differential_privacy": False, "dp_noise_multiplier": 1.0},
         "'dp_noise_multiplier' has value 1.0 but differential_privacy is false"),
        ({"differential_privacy": False, "dp_adaptive_clipping": True}, "'dp_adaptive_clipping' has value True but differential_privacy"),
        ({"differential_privacy": False, "dp_noise": "distributed"}, "'dp_noise' has value 'distributed' but differential_privacy"),
        ({"dp_noise_multiplier": 0}, "'dp_noise_multiplier' has value 0"),
        ({"dp_epsilon": -1}, "'dp_epsilon' has value -1"),
        ({"dp_mode": "record"}, "'dp_mode' has value 'record': allowed one of 'sample', 'client'"),
        ({"dp_accountant": "moments"}, "'dp_accountant' has value 'moments'"),
        ({"dp_adaptive_clipping": True}, "'dp_adaptive_clipping' has value True: it applies to dp_mode 'client' only"),
        ({"dp_noise": "distributed"}, "'dp_noise' has value 'distributed' but secure_aggregation is false"),
        ({"differential_privacy": False, "dp_sample_rate": 0.5}, "'dp_sample_rate' has value 0.5 but differential_privacy"),
        ({"dp_sample_rate": 0.5}, "'dp_sample_rate' has value 0.5: it applies to dp_mode 'sample' with dp_noise 'distributed'"),
        ({"dp_sample_rate": 0}, "'dp_sample_rate' has value 0"),
        ({"model_type": "resnet", "resnet_norm": "batch"}, "set resnet_norm: group"),
        ({"dp_mode": "client", "num_clients": 10000, "dp_delta": 1e-4}, "below 1/num_clients"),
        ({"dp_mode": "client", "dp_client_rounds": 3}, "'dp_client_rounds' has value 3: it applies to dp_mode 'sample' only"),
        ({"num_rounds": 5, "dp_client_rounds": 6}, "at most num_rounds=5"),
    ],
)
def test_impossible_privacy_settings_are_refused(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"secure_aggregation": False, **overrides})
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"secure_aggregation_method": "ckks"},
         "'dp_noise' has value 'distributed' at dp_mode 'sample' but secure_aggregation_method is 'ckks'"),
        ({"weight_decay": 0.001}, "'weight_decay' has value 0.001: with dp_noise 'distributed'"),
        ({"optimizer": "adam"}, "'optimizer' has value 'adam': with dp_noise 'distributed' at sample level"),
        ({"aggregation_method": "median"}, "'aggregation_method' has value 'median': with dp_noise 'distributed'"),
        ({"dp_mode": "client", "dp_sample_rate": 0.5}, "'dp_sample_rate' has value 0.5: it applies to dp_mode 'sample' only"),
    ],
)
def test_distributed_sample_level_noise_refuses_what_would_break_its_sum(overrides: dict, fragment: str) -> None:
    """Sample-level distributed noise adds up to one Gaussian only over one plain step per client under masking."""
    base = {"dp_noise": "distributed", "secure_aggregation": True, "num_clients": 20, "client_selection_ratio": 0.5,
            "min_clients": 4}
    accepted = config_from_dict({**base, "dp_sample_rate": 0.25})
    assert (accepted.dp_noise, accepted.dp_sample_rate, accepted.dp_mode) == ("distributed", 0.25, "sample")
    with pytest.raises(ConfigError) as err:
        config_from_dict({**base, **overrides})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("num_clients: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_replace_config_coerces_and_validates_the_whole_result() -> None:
    base = config_from_dict({"num_clients": 20, **OFF})
    changed = replace_config(base, num_rounds=7, learning_rate=1)  # an int for a float key, coerced as the loader does
    assert (changed.num_rounds, changed.learning_rate, changed.num_clients) == (7, 1.0, 20)
    assert isinstance(changed.learning_rate, float) and base.num_rounds == 100, "the original is left as it was"
    with pytest.raises(ConfigError, match="'dp_noise' has value 'distributed' but secure_aggregation is false"):
        replace_config(base, differential_privacy=True, dp_noise="distributed")
    with pytest.raises(ConfigError, match=r"unknown config key 'num_clent' \(did you mean 'num_clients'\?\)"):
        replace_config(base, num_clent=5)


def test_overrides_are_typed() -> None:
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=text", "e="]) == {"a": 1, "b": 0.5, "c": True, "d": "text", "e": None}


def test_ready_made_configs_are_valid() -> None:
    files = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    assert files, "configs/ must hold the seed's experiments"
    for f in files:
        load_config(f)


@pytest.mark.parametrize("args", [["--set", "num_rounds=abc"], ["--set", "bogus=1"], ["--config", "/nonexistent.yaml"]])
def test_cli_refuses_with_one_line_and_exit_2(args: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fl_server", "simulate", "--output", str(tmp_path / "o"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "o").exists()


def test_serve_with_the_seed_defaults_starts_with_dp_and_secure_aggregation(tmp_path: Path, small_config: dict) -> None:
    """The seed turns sample-level DP and secure aggregation on: ``serve`` with no config must start with both."""
    import os
    import signal

    import requests

    from fl_server.rest.demo import free_port, wait_healthy

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fl_server", "serve", "--state-dir", str(tmp_path / "srv"),
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, proc, timeout=240)
        status = requests.get(f"{url}/status", timeout=10).json()
        assert status["secure_aggregation"] is True and status["secagg"]["enabled"] is True
        assert status["differential_privacy"] is True and status["privacy"]["mode"] == "sample"
        assert status["state"] == "waiting_for_clients" and status["num_rounds"] == 100
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_serve_refuses_simulation_only_personalization_keys(tmp_path: Path) -> None:
    """The REST server's clients keep all their data: a held-out split it would ignore is refused, not skipped."""
    proc = subprocess.run([sys.executable, "-m", "fl_server", "serve", "--state-dir", str(tmp_path / "srv"),
                           "--set", "secure_aggregation=false", "--set", "differential_privacy=false",
                           "--set", "client_test_fraction=0.2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "client_test_fraction" in lines[0] and "simulat" in lines[0], proc.stderr


@pytest.mark.parametrize("written", ["1e-5", "1E-5", "1.0e-5", "0.00001", "1e-05"])
def test_every_way_a_person_writes_a_number_is_a_number(tmp_path, written: str) -> None:
    """YAML 1.1 reads 1e-5 as a string: 'dp_delta: 1e-5' was refused as "value '1e-5'"."""
    from fl_common.config import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(f"differential_privacy: true\ndp_delta: {written}\n")
    assert load_config(path).dp_delta == pytest.approx(1e-5)
    assert load_config(None, [f"dp_delta={written}", "differential_privacy=true"]).dp_delta == pytest.approx(1e-5)


def test_ckks_without_its_backend_is_refused_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """secure_aggregation_method: ckks needs the [he] extra: refused when the config is built, and by the backend."""
    from fl_common.he.backend import HEUnavailable, tenseal

    monkeypatch.setitem(sys.modules, "tenseal", None)  # what an environment without the extra looks like to import
    with pytest.raises(ConfigError, match=r"pip install '\.\[he\]'"):
        config_from_dict({"secure_aggregation": True, "secure_aggregation_method": "ckks", "differential_privacy": False})
    with pytest.raises(HEUnavailable, match=r"pip install '\.\[he\]'"):
        tenseal()
