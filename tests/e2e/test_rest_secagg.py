"""Secure aggregation over REST: real servers on loopback, real signing and encryption, the real
SecAgg client state machine (``fl_client.secagg_session``) on the test's side with inputs the test
chooses, so the exact expected sum is known, and real daemons for the end-to-end path.

What must hold: the server applies the weighted mean of exactly the inputs in the sum (up to the
fixed-point rounding), whoever dropped after their masked input; nothing it stores equals or
contains a client's update; every bad message is a 4xx JSON that drops its sender while the round
completes; below the threshold, or after a restart mid-round, the attempt aborts with its reason,
nothing is applied, and the next attempt starts and completes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch

from fl_client.api import ApiRefused, Credentials, ServerApi
from fl_client.heartbeat import TrainingHeartbeat
from fl_client.secagg_session import IDENTITY_FILE, SecureRoundSession, plain_input
from fl_common.privacy import make_accountant
from fl_common.protocol.rest import ENV_ADMIN_TOKEN, ENV_ENROLLMENT_TOKEN, pack_masked_upload
from fl_common.secagg import (
    AdvertiseKeys,
    ConsistencyCheck,
    MaskedInput,
    RosterMessage,
    ShareBundle,
    ShareKeys,
    SigningIdentity,
    UnmaskRequest,
    UnmaskResponse,
)
from fl_common.secagg.encoding import encode_input, pack
from fl_common.secagg.messages import CIPHERTEXT_LEN
from fl_common.tensors import wire
from fl_server.secagg import quantization_bound
from tests.e2e.harness import GunicornServer, make_cfg, threaded_server, token_env, wait_for
from tests.e2e.test_rest_daemons import shutdown, start_client

pytestmark = pytest.mark.usefixtures("small_config")  # skips cleanly when Fashion-MNIST is absent

NUMEL = 784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10  # the harness's MLP

#: secure rounds of scripted clients: every phase closes as soon as everyone expected has answered
SECURE: dict[str, Any] = {"secure_aggregation": True, "poll_interval": 0.05, "secagg_phase_timeout": 3.0,
                          "round_timeout": 30.0, "round_start_wait": 60.0, "over_selection": 0.0, "client_selection_ratio": 1.0}


class SecureClient:
    """A registered client with its own Ed25519 identity whose plain inputs the test chooses."""

    def __init__(self, url: str, env: dict[str, str], name: str, seed: int, previous: Credentials | None = None,
                 num_samples: int = 200) -> None:
        self.identity = SigningIdentity.generate_ed25519()
        self.api = ServerApi(url, timeout=30, max_retries=1)
        self.api.creds = previous  # registering a known name again is signed with its current keys
        self.reg = self.api.register(env[ENV_ENROLLMENT_TOKEN], client_name=name, partition=None, num_samples=None,
                                     capability={}, secagg_verify_key=self.identity.verify_key)
        self.id = self.reg["client_id"]
        self.api.send_profile({"num_samples": num_samples})  # a secure round selects only clients that reported their records
        self.seed = seed
        self.session: SecureRoundSession | None = None

    def join(self, round_number: int) -> SecureRoundSession:
        """Wait until selected for a fresh attempt of ``round_number`` and start a session for it."""
        status = wait_for(lambda: (s := self.api.round_status())["state"] == "selected" and s["round"] == round_number
                          and s["secagg"]["phase"] == "advertise_keys" and s, timeout=60, interval=0.05)
        self.session = SecureRoundSession(self.api, self.identity, status, encrypted=True, rng=np.random.default_rng(self.seed))
        return self.session

    @property
    def s(self) -> SecureRoundSession:
        assert self.session is not None
        return self.session

    def send(self, step: str, message: bytes) -> dict[str, Any]:
        return self.api.secagg_send(self.s.round, self.s.attempt, step, message, True)

    def fetch(self, step: str) -> bytes:
        return self.api.secagg_fetch(self.s.round, self.s.attempt, step, True)

    def plain(self, x: np.ndarray, weight: int) -> Any:
        return plain_input(self.s.params, x, weight, {})


def register(url: str, env: dict[str, str], n: int, prefix: str = "s", num_samples: int = 200) -> list[SecureClient]:
    return [SecureClient(url, env, f"{prefix}{i}", seed=100 + i, num_samples=num_samples) for i in range(n)]


def keys_shared(clients: list[SecureClient], round_number: int) -> list[SecureRoundSession]:
    """Every client joins the round, then all advertise their keys, then all share them (phases 0 and 1)."""
    sessions = [c.join(round_number) for c in clients]
    for s in sessions:
        s.advertise()
    for s in sessions:
        s.share_keys()
    return sessions


def inputs(n: int, numel: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """n update vectors and their weights; a weight stays <= W, the largest record count reported (200)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.01, numel) for _ in range(n)], [10 + 15 * k for k in range(n)]


def weighted_mean(xs: list[np.ndarray], ws: list[int]) -> torch.Tensor:
    """What an unprotected FedAvg server computes from the same inputs (server learning rate 1)."""
    return torch.from_numpy(sum(w * x for x, w in zip(xs, ws, strict=False)) / sum(ws))


def refused(call: Any, status: int, code: str) -> dict[str, Any]:
    with pytest.raises(ApiRefused) as err:
        call()
    assert (err.value.status, err.value.code) == (status, code), err.value
    assert {"error", "message", "dropped", "phase"} <= set(err.value.data), err.value.data
    return err.value.data


def history(url: str) -> list[dict[str, Any]]:
    return requests.get(f"{url}/status", timeout=60).json()["history"]  # the last round writes the run report first


def files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_session_opens_its_share_bundle_before_its_input_is_ready(tmp_path: Path) -> None:
    """The daemon's order (fl_client/daemon.py): training runs while the session advertises, shares keys and opens
    the share bundle, so when the input is asked for the bundle is already open and the end of training is followed
    by the masking alone. Four sessions run whole in threads; the applied mean is still the exact one."""
    env = token_env()
    cfg = make_cfg(num_clients=4, num_rounds=1, **SECURE)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        numel = service.coordinator.spec.numel
        clients = register(url, env, 4)
        start = service.coordinator.global_vector.clone()
        sessions = [c.join(1) for c in clients]
        xs, ws = inputs(4, numel, seed=3)
        seen: dict[int, tuple[bool, str]] = {}
        results: dict[int, Any] = {}

        def make_input(k: int) -> Any:
            seen[k] = (sessions[k]._bundle_opened, service.status()["secagg"]["current"]["phase"])
            return clients[k].plain(xs[k], ws[k]), {}

        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, sessions[k].run(lambda: make_input(k))))
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert seen == dict.fromkeys(range(4), (True, "masked_input"))
        assert all(results[k].state == "closed" and results[k].in_sum for k in range(4)), results
        got = service.coordinator.global_vector.double() - start.double()
        assert torch.allclose(got, weighted_mean(xs, ws), atol=quantization_bound(sessions[0].params, ws) + 1e-6, rtol=0)


def test_a_heartbeat_is_not_woken_by_a_secure_phase_change(tmp_path: Path) -> None:
    """A training client's heartbeat (``liveness=1``, fl_client/heartbeat.py) parked beside an ordinary long-poll
    with the same ETag: the advertisement phase closing answers the ordinary one at once, while the heartbeat
    stays parked (it only needs to be heard from; ten of them answered and asking again at each phase change was
    a request and an answer each), and is answered at its wait."""
    env = token_env()
    cfg = make_cfg(num_clients=4, num_rounds=1, **SECURE)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        clients = register(url, env, 4)
        sessions = [c.join(1) for c in clients]
        _, etag = clients[0].api.poll_round(None, 0)
        _, etag1 = clients[1].api.poll_round(None, 0)
        assert etag is not None and etag1 == etag
        answers: dict[str, Any] = {}

        def park(name: str, client: SecureClient, liveness: bool) -> None:
            answers[name] = client.api.poll_round(etag, 4.0, liveness=liveness)

        waiters = [threading.Thread(target=park, args=("push", clients[1], False)),
                   threading.Thread(target=park, args=("heartbeat", clients[0], True))]
        for w in waiters:
            w.start()
        wait_for(lambda: service.changes.waiting == 2, timeout=30, interval=0.02)
        for s in sessions:
            s.advertise()  # the last one closes the phase: share_keys
        waiters[0].join(timeout=30)
        assert answers["push"][0]["secagg"]["phase"] == "share_keys"
        wait_for(lambda: service.changes.waiting == 1, timeout=5, interval=0.02)  # the heartbeat, parked again
        assert "heartbeat" not in answers
        waiters[1].join(timeout=30)
        status, _ = answers["heartbeat"]
        assert status["state"] == "selected" and status["round"] == 1  # at its wait (the phases moved on meanwhile)


def test_a_secure_round_applies_the_exact_mean_whoever_drops_after_or_before_the_masked_input(tmp_path: Path) -> None:
    env = token_env()
    cfg = make_cfg(num_clients=8, num_rounds=2, round_timeout=4.0, **{k: v for k, v in SECURE.items() if k != "round_timeout"})
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        numel = service.coordinator.spec.numel
        clients = register(url, env, 8)
        start = service.coordinator.global_vector.clone()
        # round 1: everyone sends its masked input, two are gone before unmasking (killed after the masked-input phase)
        sessions = [c.join(1) for c in clients]
        params = sessions[0].params
        assert params.n == 8 and params.threshold <= 6
        for s in sessions:
            s.advertise()
        for s in sessions:
            s.share_keys()
        xs, ws = inputs(8, numel, seed=1)
        for c, x, w in zip(clients, xs, ws, strict=False):
            c.s.masked_input(c.plain(x, w), {"dp_steps": 3.0, "train_loss": 9.0})
        assert service.status()["secagg"]["current"]["phase"] == "consistency_check"
        for s in sessions:  # all eight sign the survivor set; two are gone before unmasking
            s.consistency()
        assert service.status()["secagg"]["current"]["phase"] == "unmask"
        assert service.status()["secagg"]["current"]["signed"] == 8
        for s in sessions[:6]:
            s.unmask()
        outcome = sessions[0].outcome()  # the unmask phase waits for the two until its deadline
        assert outcome["state"] == "closed" and outcome["in_sum"] is True
        assert sessions[7].outcome()["in_sum"] is True  # dropped after its masked input: its input is in the sum
        assert history(url)[0]["clients"] == 8
        got = service.coordinator.global_vector.double() - start.double()
        tol = quantization_bound(params, ws) + 1e-6
        assert torch.allclose(got, weighted_mean(xs, ws), atol=tol, rtol=0)
        status = service.status()["secagg"]
        assert status["rounds_completed"] == 1 and status["dropouts_by_phase"] == {"unmask": 2}
        # round 2: two are gone after sharing their keys (before their masked input): their masks are removed
        after1 = service.coordinator.global_vector.clone()
        sessions2 = keys_shared(clients, 2)
        xs2, ws2 = inputs(8, numel, seed=2)
        for c, x, w in list(zip(clients, xs2, ws2, strict=False))[:6]:
            c.s.masked_input(c.plain(x, w), {})
        for s in sessions2[:6]:
            s.consistency()  # waits for the masked-input deadline (round_timeout) first
        for s in sessions2[:6]:
            s.unmask()
        assert sessions2[0].outcome()["state"] == "closed"
        assert sessions2[7].outcome()["in_sum"] is False
        assert history(url)[1]["clients"] == 6
        got = service.coordinator.global_vector.double() - after1.double()
        assert torch.allclose(got, weighted_mean(xs2[:6], ws2[:6]), atol=quantization_bound(sessions2[0].params, ws2[:6]) + 1e-6,
                              rtol=0)
        assert service.status()["state"] == "finished"
        summary = service.summary()["secure_aggregation"]
        assert summary["rounds_completed"] == 2 and summary["bytes_per_client_per_phase"]["masked_input"]["up"] > 0
        assert summary["mean_dropouts_per_round"] == {"advertise_keys": 0.0, "share_keys": 0.0, "masked_input": 1.0,
                                                      "consistency_check": 0.0, "unmask": 1.0}
        # each finished attempt keeps its timeline (server clock): when it opened, when each phase closed, in order
        attempts = json.loads(service.store.get_meta("secagg_history") or "{}")["attempts"]
        assert len(attempts) == 2
        for a in attempts:
            t = a["timeline"]
            marks = [t[ph] for ph in ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask")]
            assert t["opened_at"] > 0 and marks[0] >= 0 and marks == sorted(marks)
        written = json.loads((tmp_path / "srv" / "run" / "summary.json").read_text())["secure_aggregation"]
        assert written["rounds_completed"] == 2 and written["last_round_parameters"]["clients"] == 8
        # the run report says what the parameters withstand and what the server still saw per client
        last = written["last_round_parameters"]
        assert last["tolerated_corrupt"] >= 1 and last["failure_bound"] > last["failure_target"] and not last["meets_target"]
        assert any("record count" in line for line in written["in_clear_per_client"])
        # nothing per client is kept: no masked payload files, no training loss in the clear
        assert not (tmp_path / "srv" / "updates").exists()
        rows = [u for r in service.store.round_rows() for u in service.store.updates_for_round(r.round_id)]
        assert len(rows) == 14 and all(set(u.metrics) <= {"dp_steps"} and u.num_samples == 1 for u in rows)
    # What the server stored (SQLite, WAL, checkpoints, run folder) never holds any client's update, in any encoding.
    stored = files_under(tmp_path / "srv")
    assert any(p.name == "server.db" for p in stored)
    for k, (x, w) in enumerate(zip(xs, ws, strict=False)):
        encoded, _ = encode_input(params, plain_input(params, x, w, {}), np.random.default_rng(100 + k))
        mid = len(x) // 2
        scaled = w * x / params.weight_bound
        needles = [x.astype("<f4").tobytes()[4 * mid:4 * mid + 64], x.astype("<f8").tobytes()[8 * mid:8 * mid + 64],
                   pack(encoded, params.modulus_bits)[mid:mid + 48], scaled.astype("<f4").tobytes()[4 * mid:4 * mid + 64]]
        for path, data in stored.items():
            assert not any(n in data for n in needles), f"{path} holds (part of) client {k}'s update"


def test_a_client_gone_silent_is_dropped_at_its_liveness_not_at_the_phase_deadline(tmp_path: Path) -> None:
    """Two clients killed after advertising their keys: the key-sharing phase (deadline 600 s) closes once the
    server has not heard from them for client_liveness (8 s), and the round applies the six others' mean."""
    env = token_env()
    cfg = make_cfg(num_clients=8, num_rounds=1, **{**SECURE, "round_timeout": 600.0, "secagg_phase_timeout": 600.0,
                                                  "client_liveness": 8.0})
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        numel = service.coordinator.spec.numel
        clients = register(url, env, 8)
        start = service.coordinator.global_vector.clone()
        sessions = [c.join(1) for c in clients]
        for s in sessions:
            s.advertise()
        # clients 6 and 7 say nothing more; the six go on (share_keys waits for the roster's phase to close)
        for s in sessions[:6]:
            s.share_keys()
        # while one of them waits for the bundle the others "train" and keep their heartbeat, as daemons do
        # (fl_client/heartbeat.py): the masked-input phase drops who the server has not heard from too
        beats = [TrainingHeartbeat(lambda c=c: ServerApi(url, timeout=30, max_retries=0), lambda c=c: c.api.creds,
                                   min_gap=0.2).start() for c in clients[:6]]
        xs, ws = inputs(8, numel, seed=3)
        for c, x, w in list(zip(clients, xs, ws, strict=False))[:6]:
            c.s.masked_input(c.plain(x, w), {})
        for b in beats:
            b.stop()
        for s in sessions[:6]:
            s.consistency()
        for s in sessions[:6]:
            s.unmask()
        outcome = sessions[0].outcome()
        assert outcome["state"] == "closed" and sessions[7].outcome()["in_sum"] is False
        assert service.status()["secagg"]["dropouts_by_phase"] == {"share_keys": 2}
        # the phase closed long before its 600 s deadline: the round is done and the run finished
        assert service.status()["state"] == "finished" and history(url)[0]["clients"] == 6
        got = service.coordinator.global_vector.double() - start.double()
        assert torch.allclose(got, weighted_mean(xs[:6], ws[:6]), atol=quantization_bound(sessions[0].params, ws[:6]) + 1e-6,
                              rtol=0)


def test_bad_input_in_every_phase_is_refused_and_drops_its_sender_while_the_round_completes(tmp_path: Path) -> None:
    env = token_env()
    # every phase here closes because everyone expected answered (or was dropped for a bad message), never at
    # its deadline: a long one keeps a loaded machine from closing the unmask phase between two scripted steps
    cfg = make_cfg(num_clients=10, num_rounds=2, secagg_threshold=0.55, **{**SECURE, "secagg_phase_timeout": 30.0})
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        numel = service.coordinator.spec.numel
        c = register(url, env, 10)
        start = service.coordinator.global_vector.clone()
        # ---------------------------------------------------------------- round 1: key advertisement and sharing
        for x in c:
            x.join(1)
        params = c[0].s.params
        assert params.threshold == 6
        digest = params.digest()
        adv = c[0].s.client.advertise()  # signed by somebody else: a substituted key
        forged = AdvertiseKeys(adv.sender, adv.c_pk, adv.s_pk, SigningIdentity.generate_ed25519().sign(
            AdvertiseKeys.signing_bytes(digest, adv.sender, adv.c_pk, adv.s_pk)))
        assert refused(lambda: c[0].send("advertise", forged.to_bytes()), 403, "bad_signature")["dropped"] is True
        early = ShareKeys(c[1].s.index, ((c[2].s.index, os.urandom(CIPHERTEXT_LEN)),), os.urandom(32), os.urandom(64))
        data = refused(lambda: c[1].send("shares", early.to_bytes()), 409, "wrong_phase")  # shares during advertisement
        assert data["dropped"] is True and data["phase"] == "advertise_keys"
        good = c[2].s.client.advertise().to_bytes()
        assert c[2].send("advertise", good)["accepted"] is True
        assert c[2].send("advertise", good)["accepted"] is True  # an identical retry is answered like the first
        for x in c[3:]:
            x.s.advertise()
        assert service.status()["secagg"]["current"]["u1"] == 8
        roster = RosterMessage.from_bytes(c[2].fetch("roster"))
        msg = c[2].s.client.share_keys(roster)  # a share for a client that is not its neighbour (re-signed: not a forgery)
        cts = (*msg.ciphertexts, (99, msg.ciphertexts[0][1]))
        bad = ShareKeys(msg.sender, cts, msg.commitment, c[2].identity.sign(ShareKeys.signing_bytes(digest, msg.sender, cts,
                                                                                                     msg.commitment)))
        assert refused(lambda: c[2].send("shares", bad.to_bytes()), 400, "unknown_neighbour")["dropped"] is True
        msg = c[3].s.client.share_keys(RosterMessage.from_bytes(c[3].fetch("roster")))  # the same share twice
        cts = (*msg.ciphertexts, msg.ciphertexts[0])
        bad = ShareKeys(msg.sender, cts, msg.commitment, c[3].identity.sign(ShareKeys.signing_bytes(digest, msg.sender, cts,
                                                                                                     msg.commitment)))
        assert refused(lambda: c[3].send("shares", bad.to_bytes()), 400, "duplicate_share")["dropped"] is True
        for x in c[4:]:
            x.s.share_keys()
        xs, ws = inputs(10, numel, seed=3)
        for k in range(4, 10):
            c[k].s.masked_input(c[k].plain(xs[k], ws[k]), {})
        for x in c[4:]:
            x.s.consistency()
        for x in c[4:]:
            x.s.unmask()
        assert c[4].s.outcome()["state"] == "closed"
        assert history(url)[0]["clients"] == 6
        got = service.coordinator.global_vector.double() - start.double()
        assert torch.allclose(got, weighted_mean(xs[4:], ws[4:]), atol=quantization_bound(params, ws[4:]) + 1e-6, rtol=0)
        assert c[0].s.outcome()["in_sum"] is False  # dropped at its advertisement
        # ---------------------------------------------------------------- round 2: shares, masked inputs, unmasking
        after1 = service.coordinator.global_vector.clone()
        for x in c:
            x.join(2)
        params = c[0].s.params
        digest = params.digest()
        for x in c:
            x.s.advertise()
        msg = c[4].s.client.share_keys(RosterMessage.from_bytes(c[4].fetch("roster")))  # a ciphertext tampered in transit
        recipient, ct = msg.ciphertexts[0]
        tampered = ShareKeys(msg.sender, ((recipient, ct[:20] + bytes([ct[20] ^ 1]) + ct[21:]), *msg.ciphertexts[1:]),
                             msg.commitment, msg.signature)
        assert refused(lambda: c[4].send("shares", tampered.to_bytes()), 403, "bad_signature")["dropped"] is True
        for k in (0, 1, 2, 3, 5, 6, 7, 8, 9):
            c[k].s.share_keys()
        xs, ws = inputs(10, numel, seed=4)
        early = UnmaskResponse(c[7].s.index, (), (), os.urandom(64))  # unmasking during the masked-input phase
        assert refused(lambda: c[7].send("unmask", early.to_bytes()), 409, "wrong_phase")["dropped"] is True
        masked = c[5].s.client.masked_input(ShareBundle.from_bytes(c[5].fetch("shares")), c[5].plain(xs[5], ws[5]))
        flipped = MaskedInput(masked.sender, bytes([masked.payload[0] ^ 1]) + masked.payload[1:], masked.rejected, masked.signature)
        upload = pack_masked_upload(flipped.to_bytes(), {})
        assert refused(lambda: c[5].api.upload_update(2, upload, "k5", True, c[5].s.attempt), 403, "bad_signature")["dropped"]
        masked = c[0].s.client.masked_input(ShareBundle.from_bytes(c[0].fetch("shares")), c[0].plain(xs[0], ws[0]))
        body = pack_masked_upload(masked.to_bytes(), {})
        assert c[0].api.upload_update(2, body, "k0", True, c[0].s.attempt)["duplicate"] is False
        assert c[0].api.upload_update(2, body, "k0", True, c[0].s.attempt)["duplicate"] is True  # a retry counts once
        other = pack_masked_upload(MaskedInput(masked.sender, masked.payload[::-1], (), masked.signature).to_bytes(), {})
        assert refused(lambda: c[0].api.upload_update(2, other, "k0b", True, c[0].s.attempt), 409,
                       "conflicting_duplicate")["dropped"] is False
        summed = [0, 1, 2, 3, 6, 8, 9]
        for k in summed[1:]:
            c[k].s.masked_input(c[k].plain(xs[k], ws[k]), {})
        check = ConsistencyCheck.from_bytes(c[6].fetch("consistency"))
        assert sorted(check.dropped) == sorted([c[5].s.index, c[7].s.index])
        signed = c[6].s.client.consistency_check(check).to_bytes()
        assert c[6].send("consistency", signed)["accepted"] is True
        assert c[6].send("consistency", signed)["accepted"] is True  # identical retry
        for k in (0, 1, 2, 3, 8, 9):
            c[k].s.consistency()
        request = UnmaskRequest.from_bytes(c[6].fetch("unmask"))
        assert sorted(request.dropped) == sorted([c[5].s.index, c[7].s.index])
        assert sorted(i for i, _ in request.signatures) == sorted(c[k].s.index for k in summed)  # every survivor signed
        response = c[6].s.client.unmask(request)
        assert c[6].send("unmask", response.to_bytes())["accepted"] is True
        assert c[6].send("unmask", response.to_bytes())["accepted"] is True  # identical retry
        fewer = response.self_shares[1:]
        second = UnmaskResponse(response.sender, fewer, response.key_shares, c[6].identity.sign(
            UnmaskResponse.signing_bytes(digest, response.sender, fewer, response.key_shares)))
        assert refused(lambda: c[6].send("unmask", second.to_bytes()), 409, "conflicting_duplicate")["dropped"] is True
        for k in (0, 1, 2, 3, 8, 9):
            c[k].s.unmask()
        assert c[0].s.outcome()["state"] == "closed"
        assert c[6].s.outcome()["in_sum"] is True and c[5].s.outcome()["in_sum"] is False
        assert history(url)[1]["clients"] == 7
        got = service.coordinator.global_vector.double() - after1.double()
        ws_in = [ws[k] for k in summed]
        assert torch.allclose(got, weighted_mean([xs[k] for k in summed], ws_in), atol=quantization_bound(params, ws_in) + 1e-6,
                              rtol=0)
        status = service.status()
        for reason in ("secagg_bad_signature", "secagg_wrong_phase", "secagg_unknown_neighbour", "secagg_duplicate_share",
                       "secagg_conflicting_duplicate"):
            assert status["rejected"].get(reason, 0) >= 1, (reason, status["rejected"])
        assert sum(status["secagg"]["dropouts_by_phase"].values()) == 8
        admin = {"Authorization": f"Bearer {env[ENV_ADMIN_TOKEN]}"}
        events = requests.get(f"{url}/api/v1/audit", headers=admin, timeout=10).json()["events"]
        assert any(e["kind"] == "secagg_unknown_neighbour" and e["client_id"] == c[2].id for e in events)


def test_below_the_threshold_the_attempt_aborts_applies_nothing_and_the_next_attempt_completes(tmp_path: Path) -> None:
    env = token_env()
    cfg = make_cfg(num_clients=5, num_rounds=1, secagg_threshold=0.6, **{**SECURE, "secagg_phase_timeout": 1.5})
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        numel = service.coordinator.spec.numel
        clients = register(url, env, 5)
        start = service.coordinator.global_vector.clone()
        first = [c.join(1) for c in clients]
        assert first[0].params.threshold == 4  # 0.6 x 5 holders, raised so that one colluding holder is withstood
        for s in first:
            s.advertise()
        for s in first[:2]:  # three never share their keys: 2 < t = 4 at the phase's deadline
            s.share_keys()
        outcome = first[0].outcome()
        assert outcome["state"] == "aborted" and "threshold" in outcome["reason"] and outcome["in_sum"] is False
        assert service.coordinator.completed_rounds == 0 and torch.equal(service.coordinator.global_vector, start)
        aborted = service.store.round_attempt(first[0].attempt)
        assert aborted is not None and aborted.state == "aborted" and "share_keys" in aborted.reason
        # the old attempt is closed for good; a new one (fresh keys, same round) starts
        refused(lambda: clients[0].fetch("shares"), 409, "attempt_closed")
        second = [c.join(1) for c in clients]
        assert second[0].attempt != first[0].attempt and second[0].params.session != first[0].params.session
        status = service.status()["secagg"]
        assert status["aborted_attempts"] == 1 and status["current"]["phase"] == "advertise_keys"
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert re.search(r"^fl_secagg_aborts_total 1\.0$", metrics, re.M)
        assert re.search(r'^fl_secagg_phase\{phase="advertise_keys"\} 1\.0$', metrics, re.M)
        assert re.search(r'^fl_secagg_dropouts_total\{phase="share_keys"\} 3\.0$', metrics, re.M)
        for s in second:
            s.advertise()
        for s in second:
            s.share_keys()
        xs, ws = inputs(5, numel, seed=5)
        for c, x, w in zip(clients, xs, ws, strict=False):
            c.s.masked_input(c.plain(x, w), {})
        for s in second:
            s.consistency()
        for s in second:
            s.unmask()
        assert second[0].outcome()["state"] == "closed"
        got = service.coordinator.global_vector.double() - start.double()
        assert torch.allclose(got, weighted_mean(xs, ws), atol=quantization_bound(second[0].params, ws) + 1e-6, rtol=0)
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert re.search(r"^fl_secagg_rounds_completed_total 1\.0$", metrics, re.M)


def test_registration_needs_a_valid_key_and_a_new_key_mid_round_drops_the_client(tmp_path: Path) -> None:
    env = token_env()
    cfg = make_cfg(num_clients=4, num_rounds=1, **SECURE)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        api = ServerApi(url, timeout=30, max_retries=1)
        with pytest.raises(ApiRefused) as err:
            api.register(env[ENV_ENROLLMENT_TOKEN], client_name="nokey", partition=None, num_samples=None, capability={})
        assert (err.value.status, err.value.code) == (400, "secagg_verify_key_required")
        with pytest.raises(ApiRefused) as err:
            api.register(env[ENV_ENROLLMENT_TOKEN], client_name="badkey", partition=None, num_samples=None, capability={},
                         secagg_verify_key=b"\x01" * 31)
        assert (err.value.status, err.value.code) == (400, "bad_secagg_verify_key")
        numel = service.coordinator.spec.numel
        clients = register(url, env, 4)
        start = service.coordinator.global_vector.clone()
        sessions = [c.join(1) for c in clients]
        # s3 registers again (proving it holds its keys) with a new signing key: out of this attempt
        again = SecureClient(url, env, "s3", seed=7, previous=clients[3].api.creds)
        status = again.api.round_status()
        assert status["state"] != "selected" and status["secagg"]["dropped"] is True
        for s in sessions[:3]:
            s.advertise()
        for s in sessions[:3]:
            s.share_keys()
        xs, ws = inputs(3, numel, seed=6)
        for c, x, w in zip(clients, xs, ws, strict=False):
            c.s.masked_input(c.plain(x, w), {})
        for s in sessions[:3]:
            s.consistency()
        for s in sessions[:3]:
            s.unmask()
        assert sessions[0].outcome()["state"] == "closed"
        got = service.coordinator.global_vector.double() - start.double()
        assert torch.allclose(got, weighted_mean(xs, ws), atol=quantization_bound(sessions[0].params, ws) + 1e-6, rtol=0)
        assert service.store.secagg_verify_key(again.id) is not None and again.id == clients[3].id


@pytest.mark.slow
def test_a_server_killed_mid_round_aborts_the_attempt_and_the_next_one_completes(tmp_path: Path) -> None:
    """Under sample-level DP: the four clients whose masked inputs had arrived (their DP-SGD outputs reached the
    server) are charged once for the aborted attempt, neither lost nor doubled by the kill and the restart's
    abort, and once more for the next attempt."""
    env = token_env()
    # 2 planned rounds: one charge for the aborted attempt and one for the next fit each client's budget
    cfg = make_cfg(num_clients=4, num_rounds=2, differential_privacy=True, dp_mode="sample", dp_epsilon=8.0,
                   dp_accountant="rdp", clip_grad_norm=1.0, **SECURE)
    server = GunicornServer(cfg, tmp_path / "srv", env)
    server.start()
    try:
        clients = register(server.url, env, 4, num_samples=cfg.max_train_samples // 4)  # the IID partitions' size
        payload, _ = clients[0].api.download_model(None, encrypted=True)
        start, _ = wire.decode_update(payload, NUMEL)
        sessions = keys_shared(clients, 1)
        xs, ws = inputs(4, start.numel(), seed=8)
        plan = clients[0].api.round_status()["instructions"]  # every client holds 200 records: one (q, steps)
        q, steps, sigma = plan["dp_sample_rate"], plan["dp_steps"], plan["dp_noise_multiplier"]
        ran = {"dp_sample_rate": q, "dp_steps": float(steps)}
        for c, x, w in zip(clients, xs, ws, strict=False):
            c.s.masked_input(c.plain(x, w), ran)
        once = make_accountant("rdp", [(sigma, q, steps)]).epsilon(1e-5)
        assert server.status()["privacy"]["epsilon_spent"] == pytest.approx(once, rel=1e-9)  # charged on arrival
        for s in sessions[:2]:  # killed in the consistency check, with two of the four signatures in
            s.consistency()
        current = server.status()["secagg"]["current"]
        assert (current["phase"], current["u3"], current["signed"]) == ("consistency_check", 4, 2)
        server.kill9()
        server.start()
        status = wait_for(lambda: (s := server.status())["secagg"]["current"] is not None and s, timeout=60)
        assert status["completed_rounds"] == 0 and status["secagg"]["aborted_attempts"] == 1
        assert "restarted" in status["secagg"]["abort_reasons"][-1]
        privacy = server.status()["privacy"]  # the charges survive the kill, and are not made twice
        assert privacy["per_client_epsilon"]["clients_participated"] == 4
        assert privacy["epsilon_spent"] == pytest.approx(once, rel=1e-9)
        assert privacy["per_client_epsilon"]["min"] == pytest.approx(once, rel=1e-9)
        refused(lambda: clients[0].fetch("unmask"), 409, "attempt_closed")
        refused(lambda: clients[2].fetch("consistency"), 409, "attempt_closed")
        assert clients[0].api.secagg_outcome(1, sessions[0].attempt)["state"] == "aborted"
        second = [c.join(1) for c in clients]
        assert second[0].attempt != sessions[0].attempt
        payload, _ = clients[0].api.download_model(None, encrypted=True)
        assert torch.equal(wire.decode_update(payload, start.numel())[0], start)  # nothing of the attempt was applied
        for s in second:
            s.advertise()
        for s in second:
            s.share_keys()
        for c, x, w in zip(clients, xs, ws, strict=False):
            c.s.masked_input(c.plain(x, w), ran)
        for s in second:
            s.consistency()
        for s in second:
            s.unmask()
        assert second[0].outcome()["state"] == "closed"
        payload, _ = clients[0].api.download_model(None, encrypted=True)
        got = wire.decode_update(payload, start.numel())[0].double() - start.double()
        assert torch.allclose(got, weighted_mean(xs, ws), atol=quantization_bound(second[0].params, ws) + 1e-6, rtol=0)
        twice = make_accountant("rdp", [(sigma, q, 2 * steps)]).epsilon(1e-5)
        assert server.status()["privacy"]["epsilon_spent"] == pytest.approx(twice, rel=1e-9) and once < twice <= 8.0
    finally:
        server.stop()


@pytest.mark.slow
def test_eight_daemons_two_killed_after_their_masked_input(tmp_path: Path) -> None:
    """The end-to-end path: daemons train, mask and unmask; the two killed once the masked-input phase is over
    stay in round 1's sum (their self masks are rebuilt from their neighbours' shares); round 2 selects them
    again (still live for the server), they never advertise keys, and it runs with the six left."""
    env = token_env()
    cfg = make_cfg(num_clients=8, num_rounds=2, secure_aggregation=True, secagg_phase_timeout=5.0, round_timeout=90.0,
                   round_start_wait=120.0, min_clients=5)
    server = GunicornServer(cfg, tmp_path / "srv", env)
    server.start()
    clients: list[subprocess.Popen] = []
    try:
        # the two victims linger between their masked input and unmasking, where they are killed
        clients = [start_client(server, env, f"v{i}", tmp_path, "--secagg-unmask-delay", "120") for i in range(2)]
        clients += [start_client(server, env, f"d{i}", tmp_path) for i in range(6)]

        def masked(name: str) -> bool:
            log = tmp_path / f"{name}.log"
            return log.is_file() and "round 1: masked input accepted" in log.read_text(errors="replace")

        # the server moves on as soon as the eighth masked input arrives; a victim writes its log line once the
        # reply reaches it, which under load can come a moment later (it then lingers 120 s before unmasking)
        wait_for(lambda: (server.status()["secagg"]["current"] or {}).get("phase") == "unmask" and masked("v0")
                 and masked("v1"), timeout=240, interval=0.1)
        current = server.status()["secagg"]["current"]
        assert current["u3"] == 8, current
        for victim in clients[:2]:
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
        status = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=300)
        for c in clients[2:]:
            assert c.wait(timeout=120) == 0
        rounds = status["history"]
        assert [r["clients"] for r in rounds] == [8, 6], rounds
        assert status["secagg"]["dropouts_by_phase"] == {"unmask": 2, "advertise_keys": 2}
        assert status["secagg"]["rounds_completed"] == 2 and status["secagg"]["aborted_attempts"] == 0
        assert status["accuracy"] > 0.3
        for i in range(6):
            key = tmp_path / f"d{i}" / IDENTITY_FILE
            assert key.stat().st_mode & 0o077 == 0 and len(key.read_bytes()) == 32
            text = (tmp_path / f"d{i}.log").read_text()
            assert "secure round closed with this client's input in the sum" in text
        summary = (tmp_path / "srv" / "run" / "summary.json").read_text()
        assert '"bytes_per_client_per_phase"' in summary
    finally:
        shutdown(server, clients)


@pytest.mark.parametrize("variant", ["scaffold", "client_dp_distributed"])
@pytest.mark.slow
def test_daemons_run_scaffold_and_distributed_client_dp_under_secure_aggregation(tmp_path: Path, variant: str) -> None:
    extra: dict[str, Any] = {"aggregation_method": "scaffold", "momentum": 0.0, "codec": "none", "compression": False} \
        if variant == "scaffold" else {"differential_privacy": True, "dp_mode": "client", "dp_noise": "distributed",
                                       "dp_noise_multiplier": 1.0, "clip_grad_norm": 1.0, "dp_epsilon": 10.0}
    env = token_env()
    cfg = make_cfg(num_clients=3, num_rounds=2, secure_aggregation=True, secagg_phase_timeout=20.0, **extra)
    server = GunicornServer(cfg, tmp_path / "srv", env)
    server.start()
    clients: list[subprocess.Popen] = []
    try:
        clients = [start_client(server, env, f"d{i}", tmp_path) for i in range(3)]
        status = wait_for(lambda: (s := server.status())["state"] == "finished" and s, timeout=300)
        assert all(c.wait(timeout=120) == 0 for c in clients)
        assert [r["clients"] for r in status["history"]] == [3, 3] and status["secagg"]["aborted_attempts"] == 0
        if variant == "scaffold":  # each variate moved once its round was applied with the client's input
            for i in range(3):
                assert (tmp_path / f"d{i}" / "scaffold_control.pt").stat().st_size > 0
        else:
            assert status["privacy"]["mode"] == "client" and 0 < status["privacy"]["epsilon_spent"] <= 10.0
    finally:
        shutdown(server, clients)


def test_plain_uploads_and_unknown_attempts_are_refused_in_a_secure_round(tmp_path: Path) -> None:
    env = token_env()
    cfg = make_cfg(num_clients=3, num_rounds=1, **SECURE)
    with threaded_server(cfg, tmp_path / "srv", env) as (url, service):
        clients = register(url, env, 3)
        for c in clients:
            c.join(1)
        numel = service.coordinator.spec.numel
        packed = wire.encode_update(torch.zeros(numel), "none", "zstd", meta={"num_samples": 5, "metrics": {}})
        data = refused(lambda: clients[0].api.upload_update(1, packed, "plain", True), 400, "malformed")
        assert data["dropped"] is True  # a plain update where a masked input belongs: out of the attempt
        with pytest.raises(ApiRefused) as err:
            clients[1].api.secagg_send(1, 999, "advertise", b"{}", True)
        assert (err.value.status, err.value.code) == (409, "attempt_closed")
        # every secure-aggregation route is described in the OpenAPI document
        doc = requests.get(f"{url}/api/v1/openapi.json", timeout=10).json()
        from fl_server.rest.app import create_app

        rules = {re.sub(r"<int:(\w+)>", "{round}", r.rule) for r in create_app(service, start_ticker=False).url_map.iter_rules()
                 if "/secagg/" in r.rule}
        assert len(rules) == 6 and rules <= set(doc["paths"])
