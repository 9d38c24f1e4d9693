"""The REST protocol on a real server on loopback: durability, idempotency, and every bad input
refused with the right status while the server's state stays exactly as it was."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
import torch

from fl_client.api import ApiRefused
from fl_common.crypto import sign_request
from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN, PATH_ROUND, PATH_UPDATE
from fl_common.tensors import wire
from tests.e2e.harness import GunicornServer, ScriptedClient, make_cfg, threaded_server, token_env, wait_for

pytestmark = pytest.mark.usefixtures("small_config")  # skips cleanly when Fashion-MNIST is absent

NUMEL = 784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10  # the harness's MLP


def _state(service) -> dict:
    s = service.status()
    current = {k: v for k, v in (s["current_round"] or {}).items() if k != "deadline_in_s"}  # a clock, not state
    return {k: s[k] for k in ("completed_rounds", "updates_accepted", "model_version")} | {"current": current,
        "arrived": sorted(service.coordinator.arrived), "global": service.coordinator.global_vector.clone()}


def _same(a: dict, b: dict) -> bool:
    same_rest = {k: v for k, v in a.items() if k != "global"} == {k: v for k, v in b.items() if k != "global"}
    return same_rest and torch.equal(a["global"], b["global"])


@pytest.fixture
def federation(tmp_path: Path):
    env = token_env()
    cfg = make_cfg(num_clients=3, max_update_bytes=6 * NUMEL + 8192)  # float32 + Fernet base64 fits
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        clients = [ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"c{i}") for i in range(3)]
        wait_for(lambda: all(c.status()["state"] == "selected" for c in clients), timeout=30)
        yield url, service, clients, env


def test_scripted_round_aggregates_exactly_and_retries_count_once(federation) -> None:
    _url, service, clients, _env = federation
    start = service.coordinator.global_vector.clone()
    r = clients[0].status()["round"]
    assert clients[0].upload(r, torch.full((NUMEL,), 1.0), num_samples=10, key="same-key")["duplicate"] is False
    assert clients[0].upload(r, torch.full((NUMEL,), 1.0), num_samples=10, key="same-key")["duplicate"] is True  # retry
    with pytest.raises(ApiRefused) as err:  # a different key for the same round is a second update: refused
        clients[0].upload(r, torch.full((NUMEL,), 5.0), num_samples=10, key="other-key")
    assert err.value.status == 409 and err.value.code == "duplicate"
    assert service.status()["current_round"]["arrived"] == 1
    clients[1].upload(r, torch.full((NUMEL,), 2.0), num_samples=30)
    clients[2].upload(r, torch.full((NUMEL,), -1.0), num_samples=60)
    wait_for(lambda: service.coordinator.completed_rounds == 1, timeout=30)
    expected = start + (10 * 1.0 + 30 * 2.0 + 60 * -1.0) / 100
    assert torch.allclose(service.coordinator.global_vector, expected, atol=1e-6)
    assert torch.allclose(clients[0].global_vector(NUMEL), expected, atol=1e-6)  # the model clients download


@pytest.mark.parametrize("case", ["no_token", "bad_token", "bad_signature", "replay", "stale", "not_selected", "wrong_round",
                                  "garbage_ciphertext", "bad_payload", "wrong_shape", "nan", "inf", "bad_samples",
                                  "oversized", "no_idempotency_key"])
def test_bad_requests_are_refused_and_change_nothing(federation, case: str) -> None:
    url, service, clients, _env = federation
    c = clients[0]
    r = c.status()["round"]
    before = _state(service)
    creds = c.api.creds
    path = PATH_UPDATE.format(round=r)
    good = torch.zeros(NUMEL)

    def raw_post(path: str, body: bytes, *, token: str | None = creds.session_token, sign: bool = True, headers=None) -> requests.Response:
        h = {"Content-Type": "application/octet-stream", "Idempotency-Key": f"bad-{case}"}
        if sign:
            h.update(sign_request("POST", path, body, client_id=creds.client_id, hmac_key=creds.keys.hmac_key))
        if token:
            h["Authorization"] = f"Bearer {token}"
        h.update(headers or {})
        return requests.post(url + path, data=body, headers=h, timeout=30)

    from fl_common.crypto import Envelope

    def sealed(vec: torch.Tensor, meta=None) -> bytes:
        return Envelope(creds.keys).seal(wire.encode_update(vec, "none", "zstd", meta=meta or {"num_samples": 5, "metrics": {}}))

    if case == "no_token":
        resp, status = raw_post(path, sealed(good), token=None), 401
    elif case == "bad_token":
        resp, status = raw_post(path, sealed(good), token="x" * 43), 401
    elif case == "bad_signature":
        body = sealed(good)
        h = sign_request("POST", path, body, client_id=creds.client_id, hmac_key=b"k" * 32)
        resp, status = raw_post(path, body, sign=False, headers=h), 401
    elif case == "replay":
        body = sealed(good)
        h = sign_request("GET", PATH_ROUND, b"", client_id=creds.client_id, hmac_key=creds.keys.hmac_key)
        requests.get(url + PATH_ROUND, headers={**h, "Authorization": f"Bearer {creds.session_token}"}, timeout=30).raise_for_status()
        resp = requests.get(url + PATH_ROUND, headers={**h, "Authorization": f"Bearer {creds.session_token}"}, timeout=30)
        status = 401
    elif case == "stale":
        body = sealed(good)
        h = sign_request("POST", path, body, client_id=creds.client_id, hmac_key=creds.keys.hmac_key, timestamp=int(time.time()) - 3600)
        resp, status = raw_post(path, body, sign=False, headers=h), 401
    elif case == "not_selected":
        service.store._db.execute("UPDATE rounds SET instructions=? WHERE state='open'", (json.dumps(
            {k: v for k, v in service.store.current_open_round().instructions.items() if k != creds.client_id}),))
        resp, status = raw_post(path, sealed(good)), 409
    elif case == "wrong_round":
        other = PATH_UPDATE.format(round=r + 5)
        resp, status = raw_post(other, sealed(good)), 409
    elif case == "garbage_ciphertext":
        resp, status = raw_post(path, b"not a fernet token"), 400
    elif case == "bad_payload":
        resp, status = raw_post(path, Envelope(creds.keys).seal(b"FLUP garbage")), 422
    elif case == "wrong_shape":
        resp, status = raw_post(path, sealed(torch.zeros(NUMEL - 1))), 422
    elif case == "nan":
        v = good.clone()
        v[7] = float("nan")
        resp, status = raw_post(path, sealed_nan(creds, v)), 422
    elif case == "inf":
        v = good.clone()
        v[3] = float("inf")
        resp, status = raw_post(path, sealed_nan(creds, v)), 422
    elif case == "bad_samples":
        resp, status = raw_post(path, sealed(good, meta={"num_samples": -3, "metrics": {}})), 422
    elif case == "oversized":
        resp, status = raw_post(path, b"\0" * (7 * NUMEL)), 413
    elif case == "no_idempotency_key":
        resp, status = raw_post(path, sealed(good), headers={"Idempotency-Key": ""}), 400
    else:
        raise AssertionError(case)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "message"} and body["message"]
    if case != "not_selected":
        assert _same(before, _state(service)), "a refused request changed the server's state"
    assert sum(service.status()["rejected"].values()) >= 1


def sealed_nan(creds, vec: torch.Tensor) -> bytes:
    """A wire payload carrying non-finite values, forged below the codec (which refuses to encode
    them): a marker value is packed uncompressed, then its bytes are overwritten."""
    import struct

    from fl_common.crypto import Envelope

    bad = vec[torch.isfinite(vec).logical_not()][0].item()
    marked = torch.where(torch.isfinite(vec), vec, torch.tensor(12345.678))
    packed = wire.encode_update(marked, "none", "none", meta={"num_samples": 5, "metrics": {}})
    marker = struct.pack("<f", 12345.678)
    assert packed.count(marker) == 1
    return Envelope(creds.keys).seal(packed.replace(marker, struct.pack("<f", bad)))


def test_admin_endpoints_need_the_admin_token(federation) -> None:
    url, _service, _clients, env = federation
    assert requests.get(f"{url}/api/v1/clients", timeout=10).status_code == 401
    assert requests.get(f"{url}/api/v1/clients", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    ok = requests.get(f"{url}/api/v1/clients", headers={"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"}, timeout=10)
    assert ok.status_code == 200 and len(ok.json()["clients"]) == 3
    audit = requests.get(f"{url}/api/v1/audit", headers={"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"}, timeout=10).json()
    kinds = {e["kind"] for e in audit["events"]}
    assert "registered" in kinds and "bad_admin_token" in kinds
    doc = requests.get(f"{url}/api/v1/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.") and "/api/v1/rounds/{round}/update" in doc["paths"]


def test_registration_is_checked(federation) -> None:
    url, service, clients, env = federation
    reg = f"{url}/api/v1/register"
    assert requests.post(reg, json={"enrollment_token": "wrong", "public_key": "x"}, timeout=10).status_code == 401
    assert requests.post(reg, data=b"not json", timeout=10).status_code == 400
    bad_key = requests.post(reg, json={"enrollment_token": env[ENV_ENROLLMENT_TOKEN], "public_key": "AAAA"}, timeout=10)
    assert bad_key.status_code == 400 and bad_key.json()["error"] == "bad_public_key"
    with pytest.raises(ApiRefused) as err:  # all 3 partitions are taken
        ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], "c-extra")
    assert err.value.status == 409 and err.value.code == "federation_full"
    assert service.store.count_clients() == 3
    # secrets never reach the store in clear: only keyed hashes of session tokens
    raw = (service.state_dir / "server.db").read_bytes()
    assert clients[0].api.creds.session_token.encode() not in raw
    assert env[ENV_ENROLLMENT_TOKEN].encode() not in raw


def test_kill_9_mid_round_loses_no_acknowledged_update(tmp_path: Path) -> None:
    env = token_env()
    server = GunicornServer(make_cfg(num_clients=3), tmp_path / "srv", env)
    server.start()
    try:
        clients = [ScriptedClient(server.url, env[ENV_ENROLLMENT_TOKEN], f"k{i}") for i in range(3)]
        wait_for(lambda: all(c.status()["state"] == "selected" for c in clients), timeout=60)
        start = clients[0].global_vector(NUMEL)
        r = clients[0].status()["round"]
        clients[0].upload(r, torch.full((NUMEL,), 1.0), num_samples=10)
        clients[1].upload(r, torch.full((NUMEL,), 2.0), num_samples=30)
        server.kill9()
        server.start()
        status = server.status()
        assert status["current_round"]["round"] == r and status["current_round"]["arrived"] == 2
        assert clients[0].upload(r, torch.full((NUMEL,), 1.0), num_samples=10)["duplicate"] is True  # retry after restart
        clients[2].upload(r, torch.full((NUMEL,), -1.0), num_samples=60)
        wait_for(lambda: server.status()["completed_rounds"] == 1, timeout=60)
        expected = start + (10 * 1.0 + 30 * 2.0 + 60 * -1.0) / 100
        assert torch.allclose(clients[0].global_vector(NUMEL), expected, atol=1e-6)
    finally:
        server.stop()


def test_an_aborted_round_is_retried_and_only_the_new_attempt_counts(tmp_path: Path) -> None:
    env = token_env()
    cfg = make_cfg(num_clients=3, min_clients=3, round_timeout=100.0, round_start_wait=0.0)
    skew = [0.0]  # the server's clock runs ahead by this much; signatures tolerate up to 300 s

    with threaded_server(cfg, tmp_path / "srv", env, clock=lambda: time.time() + skew[0]) as (url, service):
        clients = [ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"a{i}") for i in range(3)]
        wait_for(lambda: all(c.status()["state"] == "selected" for c in clients), timeout=30)
        start = service.coordinator.global_vector.clone()
        clients[0].upload(1, torch.full((NUMEL,), 100.0), num_samples=10, key="first-attempt")
        first = service.store.current_open_round().round_id
        skew[0] = 101.0  # past the deadline with only one of three updates: aborted, a new attempt opens
        def new_attempt_open() -> bool:
            for c in clients:  # polling keeps the clients live on the server's (advanced) clock
                c.status()
            row = service.store.current_open_round()
            return row is not None and row.round_id != first

        wait_for(new_attempt_open, timeout=30)
        assert service.coordinator.completed_rounds == 0 and service.coordinator.current_round == 1
        assert clients[0].upload(1, torch.full((NUMEL,), 1.0), num_samples=10, key="second-attempt")["duplicate"] is False
        clients[1].upload(1, torch.full((NUMEL,), 1.0), num_samples=10)
        clients[2].upload(1, torch.full((NUMEL,), 1.0), num_samples=10)
        # the coordinator counts the round before the store row is marked closed (checkpoint and history come
        # between), so wait for the durable record rather than the in-memory counter
        def round_states() -> list[str]:
            return [r.state for r in reversed(service.store.round_rows())]

        wait_for(lambda: round_states()[:2] == ["aborted", "closed"], timeout=30)
        assert service.coordinator.completed_rounds == 1
        assert torch.allclose(service.coordinator.global_vector, start + 1.0, atol=1e-6), "the aborted attempt leaked in"


def test_model_download_uses_etags_and_is_encrypted_per_client(federation) -> None:
    url, service, clients, _env = federation
    payload, etag = clients[0].api.download_model(None, encrypted=True)
    assert payload is not None and etag == '"v0"'
    assert clients[0].api.download_model(etag, encrypted=True) == (None, etag)  # 304: unchanged
    from fl_common.crypto import Envelope, EnvelopeError

    raw = requests.get(f"{url}/health", timeout=10)  # sanity: plain endpoint
    assert raw.status_code == 200
    # another client's key cannot open this client's download
    creds0, creds1 = clients[0].api.creds, clients[1].api.creds
    h = sign_request("GET", "/api/v1/model", b"", client_id=creds0.client_id, hmac_key=creds0.keys.hmac_key)
    resp = requests.get(f"{url}/api/v1/model", headers={**h, "Authorization": f"Bearer {creds0.session_token}"}, timeout=30)
    wrapped = resp.headers["X-FL-Model-Key"].encode()
    with pytest.raises(EnvelopeError):
        Envelope(creds1.keys).open(wrapped)
    model_key = Envelope(creds0.keys).open(wrapped)
    vec, _ = wire.decode_update(Envelope(model_key).open(resp.content), NUMEL)
    assert torch.equal(vec, service.coordinator.global_vector)
    with pytest.raises(ValueError):
        wire.decode_update(resp.content, NUMEL)  # the body alone is ciphertext
