"""Push instead of polling (fl_server/rest/state_changes.py): a long-poll of the round answers when the round
opens; a client that missed the push still gets the round by polling; bad ``wait`` values are refused; a
client falls back to polling against a server that does not long-poll. Real servers on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from fl_client.api import ApiRefused, Credentials, ServerApi
from fl_common.crypto import sign_request
from fl_common.crypto.keys import SessionKeys
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN, PATH_ROUND
from fl_server.rest.service import FederationService
from tests.e2e.harness import ScriptedClient, make_cfg, threaded_server, token_env, wait_for

pytestmark = pytest.mark.usefixtures("small_config")  # skips cleanly when Fashion-MNIST is absent


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[str, FederationService, dict[str, str], list[ScriptedClient]]]:
    """Two of the three clients a round needs (no start before all three: round_start_wait is long)."""
    env = token_env()
    cfg = make_cfg(num_clients=3, round_start_wait=600.0)
    with threaded_server(cfg, tmp_path_factory.mktemp("longpoll") / "srv", env) as (url, service):
        clients = [ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"lp{i}") for i in range(2)]
        yield url, service, env, clients


def _raw_get(client: ScriptedClient, path: str) -> requests.Response:
    creds = client.api.creds
    assert creds is not None
    headers = sign_request("GET", path, b"", client_id=creds.client_id, hmac_key=creds.keys.hmac_key)
    headers["Authorization"] = f"Bearer {creds.session_token}"
    return requests.get(client.api.base_url + path, headers=headers, timeout=30)


def test_long_poll_answers_when_the_round_opens_and_a_client_that_missed_it_still_gets_it(federation) -> None:
    url, service, env, (first, second) = federation
    status, etag = first.api.poll_round(None, 0)
    assert status["state"] == "waiting" and etag is not None
    stale_status, stale_etag = second.api.poll_round(None, 0)  # this one will miss the push
    assert stale_status["state"] == "waiting"

    answer: dict[str, Any] = {}

    def park() -> None:
        answer["status"], answer["etag"] = first.api.poll_round(etag, 25.0)

    waiter = threading.Thread(target=park)
    waiter.start()
    wait_for(lambda: service.changes.waiting == 1, timeout=30, interval=0.02)  # parked on the server, not answered
    assert "status" not in answer
    third = ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], "lp2")  # the third live client: the ticker opens the round
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert answer["status"]["state"] == "selected" and answer["status"]["round"] == 1
    assert answer["etag"] != etag
    # missed the push: its ETag is from before the round opened, so its long-poll answers at once, never parked
    parked_before = service.changes.parked_total
    missed, new_etag = second.api.poll_round(stale_etag, 25.0)
    assert missed["state"] == "selected" and missed["round"] == 1 and new_etag != stale_etag
    assert service.changes.parked_total == parked_before
    # a plain poll (no ETag to compare with) gets it too
    assert third.api.poll_round(None, 25.0)[0]["state"] == "selected"
    assert service.changes.parked_total == parked_before


def test_a_heartbeats_long_poll_is_answered_when_its_round_moves_and_a_bad_liveness_is_refused(tmp_path: Path) -> None:
    """``liveness=1`` (fl_client/heartbeat.py): not woken by secure phase changes (tests/e2e/test_rest_secagg.py),
    but answered when the client's round or state moves, like any long-poll, so its parked thread is free when a
    round opens or closes. A value other than 1 is refused with 400 bad_liveness."""
    env = token_env()
    with threaded_server(make_cfg(num_clients=3, round_start_wait=600.0), tmp_path / "srv", env) as (url, service):
        first, second = (ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"hb{i}") for i in range(2))
        _, etag = first.api.poll_round(None, 0)
        answers: dict[str, Any] = {}

        def park() -> None:
            answers["heartbeat"] = first.api.poll_round(etag, 25.0, liveness=True)

        waiter = threading.Thread(target=park)
        waiter.start()
        wait_for(lambda: service.changes.waiting == 1, timeout=30, interval=0.02)
        ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], "hb2")  # the third live client: the round opens
        waiter.join(timeout=20)  # long before its 25 s wait
        assert not waiter.is_alive() and answers["heartbeat"][0]["state"] == "selected"
        resp = _raw_get(second, f"{PATH_ROUND}?wait=1&liveness=yes")
        assert resp.status_code == 400 and resp.json()["error"] == "bad_liveness"


def test_bad_wait_values_are_refused(federation) -> None:
    _url, _service, _env, (client, _) = federation
    for raw in ["abc", "-1", "31", "1e3", "", "1.2.3", "nan", "\u00b2", "0x10", "9" * 20, " 1"]:
        resp = _raw_get(client, f"{PATH_ROUND}?wait={requests.utils.quote(raw)}")
        assert resp.status_code == 400, raw
        assert resp.json()["error"] == "bad_wait"
    resp = _raw_get(client, f"{PATH_ROUND}?wait=0.5")  # in range; no If-None-Match: answered at once
    assert resp.status_code == 200 and resp.headers["ETag"].startswith('"s')


# ------------------------------------------------------------------ a server that does not long-poll
def _old_server(refuse_wait: bool) -> Flask:
    """The round endpoint of a server from before long-polls: no ETag; ``wait`` ignored (or refused)."""
    app = Flask("old")
    app.config["seen"] = []

    @app.get(PATH_ROUND)
    def round_status() -> Any:
        app.config["seen"].append(request.full_path)
        if refuse_wait and "wait" in request.args:
            resp = jsonify({"error": "bad_wait", "message": "no"})
            resp.status_code = 400
            return resp
        return jsonify({"state": "waiting", "round": None, "model_version": 0, "poll_after": 0.2})

    return app


@pytest.mark.parametrize("refuse_wait", [False, True])
def test_client_polls_a_server_that_does_not_long_poll(refuse_wait: bool, tmp_path: Path) -> None:
    app = _old_server(refuse_wait)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        api = ServerApi(f"http://127.0.0.1:{server.server_port}", timeout=10, max_retries=0)
        api.creds = Credentials("c1", "tok", 0.0, SessionKeys(fernet_key=b"k" * 44, hmac_key=b"h" * 32))
        status, etag = api.poll_round(None, 20.0)
        assert status["state"] == "waiting" and etag is None  # no ETag: the daemon sleeps poll_after and polls
        status, etag = api.poll_round('"s-old"', 20.0)  # an ETag from elsewhere: the long-poll is answered anyway
        assert status["state"] == "waiting"
        assert api.long_poll is (not refuse_wait)  # a refused wait is not asked again
        if refuse_wait:
            assert "wait" not in app.config["seen"][-1]  # refused once, then a plain poll
    finally:
        server.shutdown()


# ------------------------------------------------------------------ secure-aggregation phases
def test_a_secure_phase_get_waits_for_its_phase_instead_of_409(tmp_path: Path) -> None:
    from fl_common.secagg import RosterMessage
    from tests.e2e.test_rest_secagg import SECURE, register

    env = token_env()
    with threaded_server(make_cfg(num_clients=3, **SECURE), tmp_path / "srv", env) as (url, service):
        clients = register(url, env, 3, prefix="ph")
        sessions = [c.join(1) for c in clients]
        sessions[0].advertise()
        sessions[1].advertise()
        with pytest.raises(ApiRefused) as early:  # a plain GET before the phase: 409 wrong_phase, as before
            clients[1].fetch("roster")
        assert early.value.code == "wrong_phase"
        clients[0].api.secagg_wait = 25.0
        got: dict[str, Any] = {}
        waiter = threading.Thread(target=lambda: got.setdefault("roster", clients[0].fetch("roster")))
        waiter.start()
        wait_for(lambda: service.changes.waiting == 1, timeout=30, interval=0.02)  # parked on the server
        assert "roster" not in got
        sessions[2].advertise()  # the last advertisement: the phase moves to share_keys and the parked GET answers
        waiter.join(timeout=60)
        assert not waiter.is_alive()
        roster = RosterMessage.from_bytes(got["roster"])
        assert sorted(e.index for e in roster.entries) == [1, 2, 3]
