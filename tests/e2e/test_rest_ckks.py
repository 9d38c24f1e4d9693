"""CKKS aggregation over REST (fl_server/rest/ckks_driver.py, fl_client/ckks_session.py): a real server on
loopback with real signing and encryption; scripted clients whose inputs the test chooses (so the expected
weighted mean is known) for the protocol and its refusals; real daemons for the end-to-end path with a
client killed mid-round and a server killed -9 mid-round (the attempt is aborted and planned again)."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch

from fl_client.api import ApiRefused, ServerApi
from fl_client.ckks_session import CKKSRoundSession
from fl_common.he import available
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN, pack_masked_upload
from tests.e2e.harness import GunicornServer, make_cfg, threaded_server, token_env, wait_for
from tests.e2e.test_rest_daemons import shutdown, start_client
from tests.server.test_metrics import scrape

pytestmark = [pytest.mark.usefixtures("small_config"),
              pytest.mark.skipif(not available(), reason="the [he] extra (tenseal) is not installed")]

CKKS: dict[str, Any] = {"secure_aggregation": True, "secure_aggregation_method": "ckks", "poll_interval": 0.05,
                        "secagg_phase_timeout": 5.0, "round_timeout": 30.0, "round_start_wait": 60.0, "over_selection": 0.0,
                        "client_selection_ratio": 1.0}


class Client:
    def __init__(self, url: str, env: dict[str, str], name: str, records: int) -> None:
        self.api = ServerApi(url, timeout=30, max_retries=1)
        self.reg = self.api.register(env[ENV_ENROLLMENT_TOKEN], client_name=name, partition=None, num_samples=None,
                                     capability={})
        self.id = self.reg["client_id"]
        self.api.send_profile({"num_samples": records})  # the public weight bound W is the largest reported

    def join(self, round_number: int) -> CKKSRoundSession:
        status = wait_for(lambda: (s := self.api.round_status())["state"] == "selected" and s["round"] == round_number
                          and s.get("secagg") and s, timeout=60, interval=0.05)
        return CKKSRoundSession(self.api, status, encrypted=True)


def test_a_ckks_round_applies_the_weighted_mean_and_refuses_what_does_not_belong(tmp_path: Path) -> None:
    env = token_env()
    cfg = make_cfg(num_clients=3, num_rounds=1, **CKKS)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        clients = [Client(url, env, f"c{i}", 200) for i in range(3)]
        sessions = [c.join(1) for c in clients]
        numel = service.coordinator.spec.numel
        start = service.coordinator.global_vector.clone()
        dec = next(i for i, s in enumerate(sessions) if s.decryptor)
        other = (dec + 1) % 3
        assert sum(s.decryptor for s in sessions) == 1
        # before the key: reading it is a wrong-phase 409 (the session would poll); only the decryptor may post one
        with pytest.raises(ApiRefused) as err:
            clients[other].api.ckks_fetch(1, sessions[other].attempt, "key", True)
        assert (err.value.status, err.value.code) == (409, "wrong_phase")
        with pytest.raises(ApiRefused) as err:
            clients[other].api.ckks_send(1, sessions[other].attempt, "key", b"x", True)
        assert (err.value.status, err.value.code) == (403, "not_decryptor")
        sessions[dec].publish_key()
        held = scrape(url)  # the ckks block of /metrics mirrors /status's, as masking's does
        assert held.get("fl_ckks_phase", phase="inputs") == 1.0 and held.get("fl_ckks_phase", phase="public_key") == 0.0
        assert (held.get("fl_ckks_round_clients", set="selected"), held.get("fl_ckks_round_clients", set="inputs")) == (3, 0)
        assert requests.get(f"{url}/status", timeout=10).json()["ckks"]["current"]["phase"] == "inputs"
        rng = np.random.default_rng(5)
        xs, ws = [rng.normal(0, 0.01, numel) for _ in range(3)], [20, 75, 130]
        # a plain update where ciphertexts belong is refused
        packed = pack_masked_upload(b"not ciphertexts", {})
        with pytest.raises(ApiRefused) as err:
            clients[other].api.upload_update(1, packed, "plain-key", True, sessions[other].attempt)
        assert (err.value.status, err.value.code) == (400, "malformed")
        for s, x, w in zip(sessions, xs, ws, strict=True):
            s.send_input(x, w, {})
        with pytest.raises(ApiRefused) as err:  # the sum is the decryptor's alone
            clients[other].api.ckks_fetch(1, sessions[other].attempt, "sum", True)
        assert (err.value.status, err.value.code) == (403, "not_decryptor")
        sessions[dec].decrypt_sum()
        assert sessions[other].outcome()["in_sum"] is True
        got = service.coordinator.global_vector.double() - start.double()
        want = torch.from_numpy(sum(w * x for w, x in zip(ws, xs, strict=True)) / sum(ws))
        bound = 2 * sessions[dec].params.weight_bound * sessions[dec].params.error_bound(3) / sum(ws) + 1e-7  # + float32 model
        assert float((got - want).abs().max()) <= bound
        status = requests.get(f"{url}/status", timeout=10).json()
        assert status["ckks"]["rounds_completed"] == 1 and status["completed_rounds"] == 1
        done = scrape(url)
        assert (done.get("fl_ckks_rounds_completed_total"), done.get("fl_ckks_aborts_total")) == (1, 0)
        assert done.get("fl_ckks_phase", phase="none") == 1.0 and done.get("fl_secagg_phase", phase="none") is None
        # every CKKS route is described in the OpenAPI document
        from fl_server.rest.app import create_app

        doc = requests.get(f"{url}/api/v1/openapi.json", timeout=10).json()
        rules = {re.sub(r"<int:(\w+)>", "{round}", r.rule) for r in create_app(service, start_ticker=False).url_map.iter_rules()
                 if "/ckks/" in r.rule}
        assert len(rules) == 4 and rules <= set(doc["paths"])
        # nothing the server stored holds a client's update: no update file at all
        assert not any((tmp_path / "srv" / "updates").rglob("*.bin"))


@pytest.mark.slow
def test_daemons_survive_a_client_killed_mid_round_and_a_server_killed_9(tmp_path: Path) -> None:
    env = token_env()
    cfg = make_cfg(num_clients=4, num_rounds=2, min_clients=2, secure_aggregation=True, secure_aggregation_method="ckks",
                   secagg_phase_timeout=20.0, round_timeout=20.0, round_start_wait=120.0, client_liveness=600.0)
    server = GunicornServer(cfg, tmp_path / "srv", env)
    server.start()
    clients: list[subprocess.Popen] = []
    try:
        clients = [start_client(server, env, f"d{i}", tmp_path) for i in range(4)]
        # the server killed -9 once the first attempt has its key: the attempt is aborted on restart, a new one follows
        wait_for(lambda: ((server.status().get("ckks") or {}).get("current") or {}).get("phase") == "inputs", timeout=240,
                 interval=0.1)
        server.kill9()
        server.start()
        status = wait_for(lambda: (s := server.status())["ckks"]["current"] is not None and s, timeout=120)
        assert status["completed_rounds"] == 0
        # a client other than the decryptor killed mid-round: the round closes without it at the deadline
        # /status does not name the decryptor: the daemon that is says so in its own log
        attempt = status["ckks"]["current"]["attempt"]
        line = f"CKKS aggregation, attempt {attempt} (this client decrypts the sum)"
        (decryptor,) = wait_for(lambda: next(((i,) for i in range(4) if line in (tmp_path / f"d{i}.log").read_text()), None),
                                timeout=120, interval=0.1)
        assert all(k not in status["ckks"]["current"] for k in ("decryptor", "decryptor_id"))
        victim = (decryptor + 1) % 4
        clients[victim].send_signal(signal.SIGKILL)
        clients[victim].wait(timeout=30)
        final = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=400)
        assert final["completed_rounds"] == 2 and len(final["history"]) == 2
        assert all(r["clients"] >= 2 for r in final["history"]), final["history"]
        assert final["ckks"]["aborted_attempts"] >= 1  # the attempt open at the kill -9
        assert final["accuracy"] > 0.1
    finally:
        shutdown(server, clients)
