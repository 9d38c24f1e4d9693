"""A daemon killed mid-training is dropped at the server's ``client_liveness``, not at ``round_timeout``, while a
client that trains for longer than that window but keeps its heartbeat (fl_client/heartbeat.py: a long-poll of
the round held open while it trains) is not. Real servers on loopback, real signing and encryption; a "kill" is
a heartbeat stopped while the others' go on (round_timeout and the phase timeouts are 600 s, so a round that
finishes at all here finished on liveness)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_client.api import ServerApi
from fl_client.heartbeat import TrainingHeartbeat
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN
from tests.e2e.harness import ScriptedClient, make_cfg, threaded_server, token_env, wait_for
from tests.e2e.test_rest_secagg import SECURE, inputs, keys_shared, register, weighted_mean

pytestmark = pytest.mark.usefixtures("small_config")  # skips cleanly when Fashion-MNIST is absent

#: seconds without a request after which the server drops a selected client (it parks a heartbeat for half)
LIVENESS = 4.0


def heartbeat(api: ServerApi) -> TrainingHeartbeat:
    """The daemon's heartbeat for a scripted client: its own HTTP session, the client's credentials."""
    return TrainingHeartbeat(lambda: ServerApi(api.base_url, timeout=30, max_retries=0), lambda: api.creds,
                             min_gap=0.2).start()


def test_secure_round_drops_a_client_killed_mid_training_at_its_liveness(tmp_path) -> None:
    env = token_env()
    cfg = make_cfg(num_clients=4, num_rounds=1, **{**SECURE, "round_timeout": 600.0, "secagg_phase_timeout": 600.0,
                                                  "client_liveness": LIVENESS})
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        clients = register(url, env, 4)
        start = service.coordinator.global_vector.clone()
        sessions = keys_shared(clients, 1)
        # all four "train" with a heartbeat; then client 0 is killed (its heartbeat stops, it sends nothing more)
        beats = [heartbeat(c.api) for c in clients]
        wait_for(lambda: all(b.beats >= 2 for b in beats), timeout=30, interval=0.05)
        beats[0].stop()
        # the three others sent nothing but heartbeats since their shares, which came before client 0's last
        # heartbeat: had the heartbeat not counted, they would be gone by the time client 0 is
        drops = wait_for(lambda: service.status()["secagg"]["current"]["dropouts_by_phase"] or None, timeout=60,
                         interval=0.1)
        assert drops == {"masked_input": 1}
        assert service.status()["secagg"]["current"]["phase"] == "masked_input"
        for b in beats[1:]:
            assert b.running
            b.stop()
        numel = service.coordinator.spec.numel
        xs, ws = inputs(4, numel, seed=5)
        for c, x, w in list(zip(clients, xs, ws, strict=True))[1:]:
            c.s.masked_input(c.plain(x, w), {})
        for s in sessions[1:]:
            s.consistency()
        for s in sessions[1:]:
            s.unmask()
        assert sessions[1].outcome()["state"] == "closed" and sessions[0].outcome()["in_sum"] is False
        got = service.coordinator.global_vector.double() - start.double()
        assert torch.allclose(got, weighted_mean(xs[1:], ws[1:]), atol=1e-3, rtol=0)


def test_plain_round_closes_once_every_client_still_out_is_gone(tmp_path) -> None:
    """Three selected, quorum three: one uploads at once, one trains past the liveness window with its heartbeat
    and then uploads, one is killed after its poll. The round closes with two at 'liveness', long before its
    600 s deadline, and only after the heartbeating client's upload."""
    env = token_env()
    cfg = make_cfg(num_clients=3, num_rounds=1, min_clients=2, round_timeout=600.0, client_liveness=LIVENESS,
                   round_start_wait=600.0)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        fast, slow, killed = (ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], f"p{i}") for i in range(3))
        statuses = [wait_for(lambda c=c: (s := c.status())["state"] == "selected" and s, timeout=60, interval=0.05)
                    for c in (fast, slow, killed)]
        numel = service.coordinator.spec.numel
        vector = torch.from_numpy(np.full(numel, 0.01, dtype=np.float32))
        assert fast.upload(1, vector)["accepted"]
        with heartbeat(slow.api):
            # the killed client's last request was its poll above: it is gone after LIVENESS s, the slow one is not
            wait_for(lambda: killed.id not in service.gateway.live_clients(), timeout=60, interval=0.1)
            assert slow.id in service.gateway.live_clients()
            assert service.status()["current_round"]["arrived"] == 1  # still open: the slow client is live
        assert slow.upload(1, vector)["accepted"]
        status = wait_for(lambda: (s := service.status())["state"] == "finished" and s, timeout=60, interval=0.05)
        assert status["history"][0]["clients"] == 2
        assert [r.reason for r in service.store.round_rows()] == ["liveness"]
        assert all(s["round"] == 1 for s in statuses)


def test_a_heartbeat_given_the_daemons_etag_parks_with_its_first_request(tmp_path) -> None:
    """The daemon hands its heartbeat the ETag of its last poll: the first beat is parked on the server at once
    (without it, the first is answered at once and only the second, a min_gap later, parks)."""
    env = token_env()
    cfg = make_cfg(num_clients=1, num_rounds=1, min_clients=1, client_liveness=LIVENESS)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        client = ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], "h0")
        wait_for(lambda: client.status()["state"] == "selected", timeout=60, interval=0.05)
        # the state version is bumped just after the round opens: a poll in between reads an older ETag
        seen: list[str | None] = [None]

        def settled() -> bool:
            _, etag = client.api.poll_round(seen[0], 0.0)
            same, seen[0] = etag == seen[0], etag
            return same

        wait_for(settled, timeout=30, interval=0.05)
        etag = seen[0]
        assert etag is not None
        beat = TrainingHeartbeat(lambda: ServerApi(client.api.base_url, timeout=30, max_retries=0),
                                 lambda: client.api.creds, min_gap=0.2, etag=etag).start()
        try:
            wait_for(lambda: service.changes.waiting == 1, timeout=30, interval=0.02)
            assert beat.beats == 1
        finally:
            beat.stop()
