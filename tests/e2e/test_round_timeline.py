"""A plain round's timeline (fl_server/rest/round_timeline.py) on a real server on loopback: what the server notes
while the round runs is stored with the attempt's row when it closes, in the order things happened, and the
downloads' byte counts (committed together, fl_server/store/sqlite.py) add up to the bytes served."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import requests
import torch

from fl_common.crypto import sign_request
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN, PATH_MODEL
from fl_server.rest.round_timeline import CLOSE_STEPS
from tests.e2e.harness import ScriptedClient, make_cfg, threaded_server, token_env, wait_for

pytestmark = pytest.mark.usefixtures("small_config")  # skips cleanly when Fashion-MNIST is absent

NUMEL = 784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10  # the harness's MLP


def _download_size(url: str, client: ScriptedClient) -> int:
    """One signed model download; the body's length (what the server counts for the round)."""
    creds = client.api.creds
    assert creds is not None
    headers = sign_request("GET", PATH_MODEL, b"", client_id=creds.client_id, hmac_key=creds.keys.hmac_key)
    resp = requests.get(f"{url}{PATH_MODEL}", headers={**headers, "Authorization": f"Bearer {creds.session_token}"},
                        timeout=30)
    assert resp.status_code == 200
    return len(resp.content)


def test_a_closed_round_stores_its_timeline_in_order(tmp_path: Path) -> None:
    env = token_env()
    cfg = make_cfg(num_clients=3, max_update_bytes=6 * NUMEL + 8192, evaluation_frequency=1)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        clients = [ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"c{i}") for i in range(3)]
        wait_for(lambda: all(c.status()["state"] == "selected" for c in clients), timeout=30)
        r = clients[0].status()["round"]
        sizes: list[int] = []
        threads = [threading.Thread(target=lambda c=c: sizes.append(_download_size(url, c))) for c in clients]
        for t in threads:  # together: their byte counts may share a commit
            t.start()
        for t in threads:
            t.join()
        assert len(sizes) == 3
        open_row = service.store.current_open_round()
        assert open_row is not None and open_row.round == r
        assert service.store.round_attempt(open_row.round_id).download_bytes == sum(sizes)
        assert service.store.round_timeline(open_row.round_id) is None  # stored when the attempt ends
        for i, c in enumerate(clients):
            c.upload(r, torch.full((NUMEL,), float(i)), num_samples=10)
        # the row is closed after the coordinator counts the round (history, checkpoint first): wait for the row
        wait_for(lambda: getattr(service.store.round_attempt(open_row.round_id), "state", None) == "closed", timeout=30)
        row = service.store.round_attempt(open_row.round_id)
        timeline = service.store.round_timeline(open_row.round_id)
    assert row is not None and row.state == "closed" and row.closed_at is not None and timeline is not None
    assert timeline["opened_at"] == row.started_at
    assert timeline["downloads"]["count"] == 3 and timeline["uploads"]["count"] == 3
    marks = [timeline["downloads"]["first"], timeline["downloads"]["last"], timeline["uploads"]["first"],
             timeline["uploads"]["last"], *(timeline[s] for s in CLOSE_STEPS)]
    assert marks == sorted(marks) and marks[0] >= 0.0
    assert timeline["closed"] == pytest.approx(row.closed_at - row.started_at, abs=1e-3)
    assert timeline["evaluation_s"] > 0.0  # evaluation_frequency 1: this close evaluated the model
    assert timeline["evaluated"] - timeline["aggregated"] == pytest.approx(timeline["evaluation_s"], abs=1e-3)
