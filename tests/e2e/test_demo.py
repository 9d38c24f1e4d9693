"""The README's main job, `python -m fl_server demo`, end to end on a smaller federation.

The command is the same one the README gives (gunicorn server + client daemon processes on
loopback); only the size is reduced with the demo's own flags so the test suite stays short.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("small_config")


@pytest.mark.slow
def test_the_demo_trains_a_federation_and_leaves_its_results(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "fl_server", "demo", "--clients", "3", "--rounds", "2", "--output", str(out),
                           "--no-progress", "--set", "model_type=mlp", "--set", "max_train_samples=3000",
                           "--set", "num_clients=3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["rounds"] == 2 and printed["final_accuracy"] > 0.2  # DP-SGD at epsilon 1 for 2 rounds: above chance
    # the last line says what was protected and how: the demo's defaults are the card's private pipeline
    privacy = printed["privacy"]
    assert privacy["differential_privacy"] is True and privacy["guarantee"].startswith("record-level")
    assert 0 < privacy["epsilon_spent"] <= privacy["epsilon_budget"] == 1.0 and privacy["delta"] == 1e-5
    assert privacy["secure_aggregation"] is True and privacy["encryption"] == "Fernet / AES-256-GCM + HMAC-SHA256"
    assert privacy["stop_reason"] == "all 2 rounds done"
    summary = json.loads((out / "server" / "run" / "summary.json").read_text())
    assert summary["privacy"]["epsilon_spent"] == privacy["epsilon_spent"]  # the line is the accountant's number
    run = out / "server" / "run"
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [1, 2] and all(int(r["clients"]) == 3 for r in rows)
    for name in ("summary.json", "model.pt", "report.html", "accuracy_loss.png"):
        assert (run / name).is_file(), name
    assert len(list((out / "logs").glob("demo-client-*.log"))) == 3
    assert (out / "logs" / "forkserver.log").is_file()  # the daemons were forked from python -m fl_client.forkserver
    # https on loopback: the clients verified the server against the CA the demo made in its state folder
    assert (out / "server" / "tls" / "ca.pem").is_file() and (out / "server" / "tls" / "server-key.pem").stat().st_mode & 0o077 == 0
    assert "https to 127.0.0.1, verified against" in (out / "logs" / "demo-client-00.log").read_text()


def test_the_daemons_get_their_enrollment_token_and_none_of_the_servers_secrets() -> None:
    from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN
    from fl_server.rest.demo import client_environment
    from fl_server.rest.secrets import ENV_SERVER_SECRET

    env = {ENV_ENROLLMENT_TOKEN: "e", ENV_ADMIN_TOKEN: "a", ENV_SERVER_SECRET: "s", "PATH": "/bin"}
    assert client_environment(env) == {ENV_ENROLLMENT_TOKEN: "e", "PATH": "/bin"}


def test_an_unknown_daemon_launch_is_refused(tmp_path: Path) -> None:
    from fl_server.rest.demo import demo_config, run_demo

    with pytest.raises(ValueError, match="launch must be one of fork, spawn"):
        run_demo(demo_config(3, private=False), tmp_path, 3, launch="thread")
    assert not any(tmp_path.iterdir())  # refused before anything started


def test_the_demo_line_states_a_dp_guarantee_exactly() -> None:
    from fl_server.rest.demo import privacy_line

    status = {"privacy": {"differential_privacy": True, "mode": "sample", "epsilon_spent": 0.97, "delta": 1e-5,
                          "epsilon_budget": 1.0, "accountant": "prv"},
              "stop_reason": None, "num_rounds": 5, "secure_aggregation": True, "encryption": True, "codec": "int8"}
    line = privacy_line(status)
    assert (line["epsilon_spent"], line["delta"], line["epsilon_budget"]) == (0.97, 1e-5, 1.0)
    assert line["guarantee"].startswith("record-level") and "maximum over clients" in line["guarantee"]
    assert line["stop_reason"] == "all 5 rounds done" and line["secure_aggregation"] is True


def test_the_demo_line_without_privacy_says_so() -> None:
    from fl_server.rest.demo import privacy_line

    line = privacy_line({"privacy": {"differential_privacy": False}, "secure_aggregation": False, "encryption": True,
                         "codec": "int8"})
    assert line["differential_privacy"] is False and "not differentially private" in line["guarantee"]
    assert line["secure_aggregation"] is False and line["encryption"] == "Fernet / AES-256-GCM + HMAC-SHA256"


def test_the_demo_is_private_by_default_and_no_privacy_turns_it_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fl_server.rest.demo import DEMO_DP_RECIPE, demo_config

    with caplog.at_level("INFO", logger="fl_common.config"):
        cfg = demo_config(10)
    assert (cfg.differential_privacy, cfg.dp_mode, cfg.dp_epsilon, cfg.dp_delta) == (True, "sample", 1.0, 1e-5)
    assert cfg.secure_aggregation and cfg.encryption and cfg.compression and cfg.codec == "int8"
    assert {k: getattr(cfg, k) for k in DEMO_DP_RECIPE} == DEMO_DP_RECIPE  # no model chosen: the demo's DP settings
    assert any("the demo's DP settings" in r.getMessage() for r in caplog.records)
    assert cfg.secagg_clip_norm == 200.0  # a noisy DP update is not shrunk by the masking's clip
    plain = demo_config(10, private=False)
    assert not plain.differential_privacy and not plain.secure_aggregation and plain.encryption
    assert (plain.model_type, plain.batch_size, plain.lr_schedule) == ("cnn", 32, "constant")  # the demo's own settings
    # a user who chooses the model keeps every setting they gave, and the recipe stays out
    mine = demo_config(10, overrides=["model_type=mlp", "learning_rate=0.2"])
    assert (mine.model_type, mine.learning_rate, mine.batch_size, mine.lr_schedule) == ("mlp", 0.2, 32, "constant")
    # a user who does not choose the model but sets the lr keeps the lr; the rest comes from the demo's settings
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.02\n")
    mixed = demo_config(10, config=config)
    assert (mixed.model_type, mixed.batch_size, mixed.learning_rate) == ("cnn", 128, 0.02)
