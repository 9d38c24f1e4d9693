"""A signed request replayed after the server restarted is still refused (README: "replays refused also across
restarts"): the nonce store is the server's SQLite file, not a per-process memory set.

A real server on loopback, a real SQLite file in its state directory, stopped and started again on the same
directory; the replay is the exact bytes and headers of a request that was accepted before the restart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from fl_client.api import ServerApi
from fl_common.crypto.signing import sign_request
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN, PATH_ROUND
from tests.e2e.harness import make_cfg, threaded_server, token_env

pytestmark = pytest.mark.usefixtures("small_config")  # skips cleanly when Fashion-MNIST is absent


def test_a_request_replayed_after_a_server_restart_is_refused(tmp_path: Path) -> None:
    env = token_env()
    cfg = make_cfg(num_clients=2, num_rounds=1)
    state = tmp_path / "srv"
    with threaded_server(cfg, state, env) as (url, _service):
        api = ServerApi(url, timeout=30, max_retries=0)
        api.register(env[ENV_ENROLLMENT_TOKEN], client_name="r0", partition=None, num_samples=None, capability={})
        creds = api.creds
        assert creds is not None
        headers = {**sign_request("GET", PATH_ROUND, b"", client_id=creds.client_id, hmac_key=creds.keys.hmac_key),
                   "Authorization": f"Bearer {creds.session_token}"}
        first = requests.get(url + PATH_ROUND, headers=headers, timeout=30)
        assert first.status_code == 200, first.text
        again = requests.get(url + PATH_ROUND, headers=headers, timeout=30)
        assert (again.status_code, again.json().get("error")) == (401, "signature_replayed_nonce")
    assert (state / "server.db").is_file()
    with threaded_server(cfg, state, env) as (url, _service):  # a new process's worth of state: only the file is shared
        replay = requests.get(url + PATH_ROUND, headers=headers, timeout=30)
        assert (replay.status_code, replay.json().get("error")) == (401, "signature_replayed_nonce")
        fresh = {**sign_request("GET", PATH_ROUND, b"", client_id=creds.client_id, hmac_key=creds.keys.hmac_key),
                 "Authorization": f"Bearer {creds.session_token}"}
        assert requests.get(url + PATH_ROUND, headers=fresh, timeout=30).status_code == 200  # the session itself survived
