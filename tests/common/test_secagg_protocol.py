"""The SecAgg / SecAgg+ protocol end to end, in process: exactness, dropouts, refusals, bad input.

Every test runs the real client and server state machines and moves their messages through
``to_bytes``/``from_bytes``, as a transport would. Keys come from the OS CSPRNG, so masks differ
on every run; what is checked (exact sums, refusals, statistics at a 1e-6 level) does not depend
on them. Stochastic rounding is seeded, so the "plain" quantised inputs can be recomputed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest

from fl_common.secagg import (
    HMAC_SHA256,
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySignature,
    MalformedMessage,
    MaskedInput,
    Phase,
    PlainInput,
    RosterMessage,
    SecAggAborted,
    SecAggClient,
    SecAggParams,
    SecAggRefused,
    SecAggRejected,
    SecAggServer,
    ShareBundle,
    ShareKeys,
    SigningIdentity,
    UnmaskRequest,
    UnmaskResponse,
)
from fl_common.secagg.encoding import decode_input_sum, encode_input, unpack
from fl_common.secagg.field import FieldOverflowError, add_mod
from fl_common.secagg.planning import plan_params
from fl_common.secagg.shamir import PRIME, Share

DIM = 500
PHASE_ORDER = [Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.CONSISTENCY_CHECK, Phase.UNMASK]


def _params(n: int, *, degree: int | None = None, auth: str = "ed25519", dim: int = DIM, **kw: Any) -> SecAggParams:
    base: dict[str, Any] = dict(round_number=3, client_ids=[f"client-{i}" for i in range(n)], vector_length=dim, clip=4.0,
                scale_bits=16, degree=degree, auth=auth, weighted=True, weight_bound=50)
    base.update(kw)
    return plan_params(**base)


def _identity(auth: str, i: int) -> SigningIdentity:
    return SigningIdentity.generate_ed25519() if auth == "ed25519" else SigningIdentity.hmac(bytes([i]) * 32)


def _wire(msg):
    """Through bytes and back, as over HTTP."""
    return type(msg).from_bytes(msg.to_bytes())


@dataclasses.dataclass
class Round:
    params: SecAggParams
    server: SecAggServer
    clients: dict[int, SecAggClient]
    inputs: dict[int, PlainInput]
    sent: dict[int, MaskedInput]


Hook = Callable[[Any, int], Any]  # each hook takes and returns one message type


Drop = dict[Phase, "set[int] | Callable[[SecAggServer], set[int]]"]


def run_round(params: SecAggParams, *, drop: Drop | None = None, hooks: dict[str, Hook] | None = None,
              identities: dict[int, SigningIdentity] | None = None, registered: dict | None = None,
              make_input: Callable[[int], PlainInput] | None = None, client_kwargs: dict | None = None) -> Round:
    """One full round. ``drop[phase]``: clients that go silent in that phase (they send nothing from
    it on), or a function of the server choosing them when the phase starts. ``hooks[name](msg, index)``
    may replace a message in flight ("advertise", "roster",
    "share_keys", "bundle", "masked", "check", "signature", "request", "unmask"); an exception it raises is propagated.
    ``client_kwargs`` go to every SecAggClient (e.g. ``trusted_verify_keys``)."""
    drop = drop or {}
    hooks = hooks or {}
    identities = identities or {i: _identity(params.auth, i) for i in params.indices}
    verifiers = registered or {i: identities[i].verifier() for i in params.indices}
    server = SecAggServer(params, verifiers, now=0.0)
    clients = {i: SecAggClient(params, i, identities[i], rng=np.random.default_rng(100 + i), **(client_kwargs or {}))
               for i in params.indices}
    rng = np.random.default_rng(7)
    delta = params.segment("delta")
    assert delta is not None
    inputs = {i: PlainInput(rng.uniform(-0.2, 0.2, delta.length), weight=int(rng.integers(1, 51)))
              for i in params.indices}
    if make_input is not None:
        inputs = {i: make_input(i) for i in params.indices}
    sent: dict[int, MaskedInput] = {}
    gone: set[int] = set()

    def hook(name: str, msg, i: int):
        return hooks[name](msg, i) if name in hooks else msg

    def deliver(receive, msg) -> None:
        with contextlib.suppress(SecAggRejected):
            receive(_wire(msg), now)

    for now, phase in enumerate(PHASE_ORDER, start=1):
        chosen = drop.get(phase, set())
        gone |= chosen(server) if callable(chosen) else chosen
        if server.finished:
            break
        live = [i for i in params.indices if i not in gone]
        for i in live:
            c = clients[i]
            if phase == Phase.ADVERTISE_KEYS:
                deliver(server.receive_advertise, hook("advertise", c.advertise(), i))
            elif phase == Phase.SHARE_KEYS and i in server.u1:
                roster = hook("roster", _wire(server.roster_for(i)), i)
                deliver(server.receive_share_keys, hook("share_keys", c.share_keys(roster), i))
            elif phase == Phase.MASKED_INPUT and i in server.u2 and i not in server.drops:
                bundle = hook("bundle", _wire(server.bundle_for(i)), i)
                msg = hook("masked", c.masked_input(bundle, inputs[i]), i)
                sent[i] = msg
                deliver(server.receive_masked_input, msg)
            elif phase == Phase.CONSISTENCY_CHECK and i in server.u3 and i not in server.drops:
                check = hook("check", _wire(server.consistency_check_for(i)), i)
                deliver(server.receive_consistency, hook("signature", c.consistency_check(check), i))
            elif phase == Phase.UNMASK and i in server.u4 and i not in server.drops:
                request = hook("request", _wire(server.unmask_request_for(i)), i)
                deliver(server.receive_unmask, hook("unmask", c.unmask(request), i))
        if server.phase == phase:  # the phase closes by itself once everyone expected has answered
            server.close_phase(float(now))
    return Round(params, server, clients, inputs, sent)


def plain_sum(r: Round, indices) -> np.ndarray:
    """The field sum of the clients' quantised inputs, recomputed from the same rounding seeds."""
    p = r.params
    total = np.zeros(p.vector_length, dtype=np.uint64)
    for i in indices:
        x, _ = encode_input(p, r.inputs[i], np.random.default_rng(100 + i))
        total = add_mod(total, x, p.modulus_bits)
    return total


def assert_exact(r: Round) -> None:
    result = r.server.result()
    expected = decode_input_sum(r.params, plain_sum(r, result.summed), len(result.summed))
    np.testing.assert_array_equal(result.sums.delta, expected.delta)  # bit-exact, not approximately
    assert result.sums.weight == sum(min(r.inputs[i].weight, r.params.weight_bound) for i in result.summed)
    assert result.sums.count == len(result.summed)
    # and the decoded sum is the float sum of the weighted inputs up to one rounding unit per client
    p = r.params
    want = sum(r.inputs[i].delta * r.inputs[i].weight / p.weight_bound for i in result.summed)
    assert np.max(np.abs(result.sums.delta - want)) <= len(result.summed) * 2.0 ** -16


# --------------------------------------------------------------------------- exactness and dropouts
def test_no_dropouts_gives_the_exact_sum() -> None:
    r = run_round(_params(6))
    assert r.server.phase == Phase.DONE and r.server.result().summed == tuple(range(1, 7))
    assert_exact(r)
    assert not r.server.drops and not r.server.events


@pytest.mark.parametrize("phase", PHASE_ORDER)
def test_up_to_n_minus_t_dropouts_in_any_phase_still_give_the_exact_sum(phase: Phase) -> None:
    p = _params(7)
    gone = set(range(1, p.n - p.threshold + 1))  # n - t clients
    r = run_round(p, drop={phase: gone})
    assert r.server.phase == Phase.DONE, r.server.abort_reason
    assert_exact(r)
    summed = set(r.server.result().summed)
    if phase in (Phase.CONSISTENCY_CHECK, Phase.UNMASK):  # their masked inputs are in: masks removed through neighbours
        assert summed == set(p.indices)
    else:
        assert summed == set(p.indices) - gone
    assert {d.index for d in r.server.drops.values()} == gone
    assert all(d.phase == phase.value and d.reason == "no_response" for d in r.server.drops.values())


def test_dropouts_spread_over_every_phase() -> None:
    p = _params(9)
    assert p.n - p.threshold >= 3
    r = run_round(p, drop={Phase.SHARE_KEYS: {2}, Phase.MASKED_INPUT: {5}, Phase.UNMASK: {9}})
    assert_exact(r)
    assert r.server.result().summed == (1, 3, 4, 6, 7, 8, 9)
    assert {i: d.phase for i, d in r.server.drops.items()} == {2: "share_keys", 5: "masked_input", 9: "unmask"}


@pytest.mark.parametrize("phase", PHASE_ORDER)
def test_below_threshold_the_round_aborts_and_releases_nothing(phase: Phase) -> None:
    p = _params(7)
    r = run_round(p, drop={phase: set(range(1, p.n - p.threshold + 2))})  # n - t + 1 clients
    assert r.server.phase == Phase.ABORTED
    assert "threshold" in (r.server.abort_reason or "")
    with pytest.raises(SecAggAborted, match="aborted"):
        r.server.result()
    assert r.server._sum is None  # the running sum is discarded


def test_secagg_plus_sparse_graph_with_dropouts() -> None:
    p = _params(30, degree=6)
    assert p.degree == 6 and p.threshold == 5  # 7 holders: 2t > 7 + 1 withstands one colluding holder
    plan: list[int] = []
    chosen: set[int] = set()

    def spread(count: int) -> Callable[[SecAggServer], set[int]]:
        """``count`` more dropouts such that no client loses more than 2 of the 7 holders of its shares (its 6
        neighbours and itself: a dropped client with 2 dropped neighbours leaves 4 < t). The graph depends on
        the fresh keys, so the five dropouts are planned once it is known, by a search, and handed out
        1 + 2 + 2 over the phases."""
        def pick(server: SecAggServer) -> set[int]:
            if not plan:
                g = server.graph
                plan.extend(next(c for c in itertools.combinations(sorted(g), 5)
                                 if all(len(g[u] & set(c)) + (u in c) <= 2 for u in g)))
            new = set(plan[len(chosen):len(chosen) + count])
            chosen.update(new)
            return new
        return pick

    r = run_round(p, drop={Phase.SHARE_KEYS: spread(1), Phase.MASKED_INPUT: spread(2), Phase.UNMASK: spread(2)})
    assert len(chosen) == 5
    assert r.server.phase == Phase.DONE, r.server.abort_reason
    assert_exact(r)
    graph = r.server.graph
    assert all(len(graph[u]) == 6 for u in r.server.u1)
    # each client's shares went to its 6 neighbours only, not to everyone
    assert all(len(m.ciphertexts) == 6 for m in r.server._share_msgs.values())
    # 5 clients dropped in all; the complete graph with its threshold would tolerate n - t = 16, but it is
    # the neighbourhoods that matter here, each of which kept at least t holders


def test_secagg_plus_aborts_when_one_neighbourhood_loses_too_many() -> None:
    p = _params(20, degree=6)
    # at unmasking, 4 of client 1's 6 neighbours go silent: 2 + itself = 3 holders < t = 5
    r = run_round(p, drop={Phase.UNMASK: lambda server: set(sorted(server.graph[1])[:4])})
    assert r.server.phase == Phase.ABORTED
    assert "client 1's self-mask seed has 3 live share holders, fewer than the threshold t=5" in (r.server.abort_reason or "")


def test_hmac_authentication_runs_a_full_round() -> None:
    r = run_round(_params(5, auth=HMAC_SHA256), drop={Phase.MASKED_INPUT: {4}})
    assert_exact(r)


# --------------------------------------------------------------------------- what the server sees
def test_masked_inputs_are_uniform_and_never_equal_an_update() -> None:
    p = _params(5, dim=20000)
    r = run_round(p)
    b = p.modulus_bits
    for i, msg in r.sent.items():
        y = unpack(msg.payload, p.vector_length, b)
        x, _ = encode_input(p, r.inputs[i], np.random.default_rng(100 + i))
        # no stored value reveals the update: coincidences only at the 2^-b rate (~0.001 expected here)
        assert int(np.sum(y == x)) <= 3
        # chi-square on the top 8 bits and on the low 8 bits: 256 bins, 255 dof; critical value at 1e-6
        for bins in ((y >> np.uint64(b - 8)).astype(np.int64), (y & np.uint64(255)).astype(np.int64)):
            counts = np.bincount(bins, minlength=256)
            expected = len(bins) / 256
            chi2 = float(np.sum((counts - expected) ** 2 / expected))
            assert chi2 < 380.0, chi2
    # even an all-zero input is uniform once masked (20000 draws from 2^22 values: ~48 collisions expected)
    p0 = _params(4, dim=20000)
    zero = run_round(p0, make_input=lambda i: PlainInput(np.zeros(20000), weight=1))
    y = unpack(zero.sent[1].payload, p0.vector_length, p0.modulus_bits)[:20000]
    assert p0.modulus_bits == 22 and len(np.unique(y)) > 19850
    counts = np.bincount((y >> np.uint64(p0.modulus_bits - 8)).astype(np.int64), minlength=256)
    assert float(np.sum((counts - 20000 / 256) ** 2 / (20000 / 256))) < 380.0
    assert_exact(zero)


def test_the_server_keeps_no_plaintext() -> None:
    p = _params(4)
    r = run_round(p)
    state = vars(r.server)
    assert "_sum" in state and state["_sum"] is None  # released as the decoded sum only
    for value in state.values():
        if isinstance(value, np.ndarray):
            for i in p.indices:
                x, _ = encode_input(p, r.inputs[i], np.random.default_rng(100 + i))
                assert not np.array_equal(value, x)


# --------------------------------------------------------------------------- bad input -> dropped
def _resign(identity: SigningIdentity, msg, digest: bytes):
    if isinstance(msg, ShareKeys):
        return dataclasses.replace(msg, signature=identity.sign(ShareKeys.signing_bytes(digest, msg.sender, msg.ciphertexts,
                                                                                          msg.commitment)))
    if isinstance(msg, UnmaskResponse):
        return dataclasses.replace(msg, signature=identity.sign(UnmaskResponse.signing_bytes(
            digest, msg.sender, msg.self_shares, msg.key_shares)))
    raise TypeError(type(msg))


def _flip(data: bytes, at: int = 20) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


def test_bad_advertisement_signature_drops_the_client() -> None:
    def forge(msg: AdvertiseKeys, i: int) -> AdvertiseKeys:
        return dataclasses.replace(msg, signature=_flip(msg.signature, 3)) if i == 2 else msg

    r = run_round(_params(6), hooks={"advertise": forge})
    assert r.server.drops[2].reason == "bad_signature" and r.server.drops[2].phase == "advertise_keys"
    assert 2 not in r.server.u1
    assert_exact(r)


def test_ciphertext_tampered_on_the_way_to_the_server_drops_the_sender() -> None:
    def tamper(msg: ShareKeys, i: int) -> ShareKeys:
        if i != 3:
            return msg
        (r0, ct0), *rest = msg.ciphertexts
        return dataclasses.replace(msg, ciphertexts=((r0, _flip(ct0)), *rest))

    r = run_round(_params(6), hooks={"share_keys": tamper})
    assert r.server.drops[3].reason == "bad_signature" and 3 not in r.server.u2
    assert_exact(r)


def test_ciphertext_tampered_after_the_server_is_refused_by_its_recipient() -> None:
    def tamper(bundle: ShareBundle, i: int) -> ShareBundle:
        if i != 1:
            return bundle
        cts = tuple((s, _flip(ct) if s == 4 else ct) for s, ct in bundle.ciphertexts)
        return dataclasses.replace(bundle, ciphertexts=cts)

    r = run_round(_params(6), hooks={"bundle": tamper})
    assert r.clients[1].rejected == (4,)
    assert r.server.events[0]["event"] == "share_rejected_by_recipient"
    assert (r.server.events[0]["sender"], r.server.events[0]["recipient"]) == (4, 1)
    assert_exact(r)  # client 4's self mask is rebuilt from its other holders' shares


@pytest.mark.parametrize("fault", ["duplicate", "unknown", "missing"])
def test_malformed_share_sets_drop_the_sender(fault: str) -> None:
    p = _params(12, degree=4)
    ids = {i: _identity(p.auth, i) for i in p.indices}
    digest = p.digest()

    def bad(msg: ShareKeys, i: int) -> ShareKeys:
        if i != 5:
            return msg
        cts = list(msg.ciphertexts)
        if fault == "duplicate":
            cts.append(cts[0])
        elif fault == "unknown":
            outsider = next(j for j in p.indices if j != 5 and j not in {r for r, _ in cts})
            cts[0] = (outsider, cts[0][1])
        else:
            cts.pop()
        return _resign(ids[5], dataclasses.replace(msg, ciphertexts=tuple(cts)), digest)

    r = run_round(p, hooks={"share_keys": bad}, identities=ids)
    reason = {"duplicate": "duplicate_share", "unknown": "unknown_neighbour", "missing": "missing_share"}[fault]
    assert r.server.drops[5].reason == reason
    assert r.server.phase == Phase.DONE, r.server.abort_reason
    assert_exact(r)


def test_wrong_phase_and_conflicting_duplicates_are_refused() -> None:
    p = _params(6)
    ids = {i: _identity(p.auth, i) for i in p.indices}
    server = SecAggServer(p, {i: ids[i].verifier() for i in p.indices}, now=0.0)
    clients = {i: SecAggClient(p, i, ids[i]) for i in p.indices}
    adverts = {i: c.advertise() for i, c in clients.items()}
    for i in (1, 2, 3, 4, 5):
        server.receive_advertise(adverts[i], 1.0)
    server.receive_advertise(adverts[1], 1.0)  # an identical retry is idempotent
    with pytest.raises(SecAggRejected) as err:
        server.receive_advertise(dataclasses.replace(adverts[6], sender=7), 1.0)
    assert err.value.code == "unknown_client" and not err.value.dropped
    server.receive_advertise(adverts[6], 1.0)  # the last one closes the phase
    assert server.phase == Phase.SHARE_KEYS
    with pytest.raises(SecAggRejected) as err:  # a masked input in the share-keys phase
        server.receive_masked_input(MaskedInput(2, b"\0" * 8, (), b"x" * 64), 2.0)
    assert err.value.code == "wrong_phase" and err.value.dropped and server.drops[2].reason == "wrong_phase"
    server.receive_advertise(adverts[3], 2.0)  # an old retry is still harmless
    assert 3 not in server.drops
    shares = {i: clients[i].share_keys(server.roster_for(i)) for i in (1, 3, 4, 5, 6)}
    server.receive_share_keys(shares[1], 2.0)
    other = _resign(ids[1], dataclasses.replace(shares[1], commitment=b"\1" * 32), p.digest())
    with pytest.raises(SecAggRejected) as err:
        server.receive_share_keys(other, 2.0)
    assert err.value.code == "conflicting_duplicate" and server.drops[1].phase == "share_keys"


def test_malformed_masked_input_drops_the_client_and_a_later_one_cannot_unsum() -> None:
    def truncate(msg: MaskedInput, i: int) -> MaskedInput:
        return MaskedInput(msg.sender, msg.payload[:-1], msg.rejected, msg.signature) if i == 2 else msg

    r = run_round(_params(6), hooks={"masked": truncate})
    assert r.server.drops[2].reason in ("malformed", "bad_signature")
    assert 2 not in r.server.u3
    assert_exact(r)


def test_a_tampered_unmask_share_is_outvoted_and_its_holder_recorded() -> None:
    p = _params(7)
    ids = {i: _identity(p.auth, i) for i in p.indices}

    def lie(msg: UnmaskResponse, i: int) -> UnmaskResponse:
        if i != 1:
            return msg
        shares = []
        for v, raw in msg.self_shares:
            s = Share.from_bytes(raw)
            shares.append((v, Share(s.x, (s.y + 1) % PRIME).to_bytes() if v == 2 else raw))
        return _resign(ids[1], dataclasses.replace(msg, self_shares=tuple(shares)), p.digest())

    r = run_round(p, hooks={"unmask": lie}, identities=ids)
    assert r.server.phase == Phase.DONE, r.server.abort_reason
    assert_exact(r)
    assert {k: v for k, v in r.server.events[0].items() if k != "at"} == \
        {"event": "inconsistent_share", "owner": 2, "kind": "self_seed", "holder": 1}


# --------------------------------------------------------------------------- client refusals
def _masked_clients(n: int = 5) -> tuple[SecAggParams, dict[int, SecAggClient], SecAggServer]:
    p = _params(n)
    ids = {i: _identity(p.auth, i) for i in p.indices}
    server = SecAggServer(p, {i: ids[i].verifier() for i in p.indices}, now=0.0)
    clients = {i: SecAggClient(p, i, ids[i]) for i in p.indices}
    for c in clients.values():
        server.receive_advertise(c.advertise(), 1.0)
    for i, c in clients.items():
        server.receive_share_keys(c.share_keys(server.roster_for(i)), 2.0)
    for i, c in clients.items():
        c.masked_input(server.bundle_for(i), PlainInput(np.zeros(DIM), weight=1))
    return p, clients, server


def test_masking_an_input_needs_the_opened_bundle_and_opening_it_early_changes_nothing() -> None:
    """A daemon opens its share bundle while it trains (``open_bundle``) and masks once training ends
    (``mask_opened``): refused before the bundle is opened; once opened, the input it sends is the one
    ``masked_input`` sends in one step (same rounding stream, same masks: the same bytes)."""
    p = _params(5)
    ids = {i: _identity(p.auth, i) for i in p.indices}
    server = SecAggServer(p, {i: ids[i].verifier() for i in p.indices}, now=0.0)
    clients = {i: SecAggClient(p, i, ids[i], rng=np.random.default_rng(7)) for i in p.indices}
    for c in clients.values():
        server.receive_advertise(c.advertise(), 1.0)
    for i, c in clients.items():
        server.receive_share_keys(c.share_keys(server.roster_for(i)), 2.0)
    x = PlainInput(np.linspace(-0.5, 0.5, DIM), weight=1)
    with pytest.raises(SecAggRefused) as err:
        clients[1].mask_opened(x)
    assert err.value.code == "bad_bundle"
    twin = copy.deepcopy(clients[1])  # the same keys, secrets and rounding stream
    assert clients[1].open_bundle(server.bundle_for(1)) == frozenset(p.indices) - {1}
    early = clients[1].mask_opened(x)
    assert early.payload == twin.masked_input(server.bundle_for(1), x).payload


def signed_request(clients: dict[int, SecAggClient], survivors: tuple[int, ...], dropped: tuple[int, ...],
                   signers: Iterable[int] | None = None) -> UnmaskRequest:
    """What an (honest or lying) server builds: the set shown to ``signers`` (default: every survivor), each of
    whom signs it, and the unmask request carrying their signatures."""
    check = ConsistencyCheck(survivors, dropped)
    sigs = tuple((i, clients[i].consistency_check(check).signature) for i in (survivors if signers is None else signers))
    return UnmaskRequest(survivors, dropped, sigs)


def test_a_client_never_reveals_both_shares_of_one_peer() -> None:
    _p, clients, _ = _masked_clients()
    with pytest.raises(SecAggRefused) as err:  # refused when asked to sign such a set ...
        clients[1].consistency_check(ConsistencyCheck(survivors=(1, 2, 3, 4), dropped=(4, 5)))
    assert err.value.code == "both_shares_requested"
    with pytest.raises(SecAggRefused):  # ... which it did not sign, and a set it did not sign is never answered
        clients[1].unmask(UnmaskRequest(survivors=(1, 2, 3, 4), dropped=(4, 5)))
    request = signed_request(clients, (1, 2, 3, 4), (5,))
    response = clients[1].unmask(request)
    assert {v for v, _ in response.self_shares} == {1, 2, 3, 4} and {v for v, _ in response.key_shares} == {5}
    # answering once, then being asked again with 2 "dropped", is refused too: one set, one answer per attempt
    with pytest.raises(SecAggRefused, match="one unmask request"):
        clients[1].unmask(UnmaskRequest(survivors=(1, 3, 4), dropped=(2, 5), signatures=request.signatures))
    with pytest.raises(SecAggRefused, match="one set per round"):
        clients[2].consistency_check(ConsistencyCheck(survivors=(1, 3, 4), dropped=(2, 5)))


def test_a_client_refuses_inconsistent_unmask_requests() -> None:
    p, clients, _ = _masked_clients()
    with pytest.raises(SecAggRefused) as err:
        clients[2].consistency_check(ConsistencyCheck(survivors=(1, 3, 4, 5), dropped=(2,)))
    assert err.value.code == "bad_unmask_request"
    with pytest.raises(SecAggRefused) as err:  # fewer than t survivors: the sum would hide too little
        clients[2].consistency_check(ConsistencyCheck(survivors=(2, *tuple(range(3, 3 + p.threshold - 2))), dropped=()))
    assert err.value.code == "too_few_survivors"
    response = clients[3].unmask(signed_request(clients, (1, 2, 3, 4), (5,)))
    assert {v for v, _ in response.self_shares} == {1, 2, 3, 4} and {v for v, _ in response.key_shares} == {5}


def test_a_client_refuses_a_roster_with_a_substituted_key() -> None:
    p = _params(5)
    evil = SigningIdentity.generate_ed25519()

    def substitute(roster: RosterMessage, i: int) -> RosterMessage:
        if i != 1:
            return roster
        entries = list(roster.entries)
        e = entries[1]
        fake_s = SecAggClient(p, 2, evil).advertise().s_pk
        entries[1] = dataclasses.replace(e, s_pk=fake_s)
        return dataclasses.replace(roster, entries=tuple(entries))

    with pytest.raises(SecAggRefused) as err:
        run_round(p, hooks={"roster": substitute})
    assert err.value.code == "bad_roster_signature"


def _resigned_substitution(p: SecAggParams, ids: dict[int, SigningIdentity]
                           ) -> tuple[Callable[[RosterMessage, int], RosterMessage], SigningIdentity, SecAggServer]:
    """A malicious server's attack on client 2: it advertises keys of its own for index 2, signed with its
    own Ed25519 key, and ships its own verifying key in the roster. Returns the roster hook, the server's
    key, and an honest server state machine in which clients 3..5 and the fake 2 have advertised."""
    evil = SigningIdentity.generate_ed25519()
    fake = SecAggClient(p, 2, evil).advertise()

    def substitute(roster: RosterMessage, i: int) -> RosterMessage:
        return dataclasses.replace(roster, entries=tuple(
            dataclasses.replace(e, c_pk=fake.c_pk, s_pk=fake.s_pk, signature=fake.signature, verify_key=evil.verify_key)
            if e.index == 2 else e for e in roster.entries))

    server = SecAggServer(p, {i: ids[i].verifier() for i in p.indices}, now=0.0)
    for i in (3, 4, 5):
        server.receive_advertise(SecAggClient(p, i, ids[i]).advertise(), 1.0)
    server.receive_advertise(dataclasses.replace(fake, signature=ids[2].sign(AdvertiseKeys.signing_bytes(
        p.digest(), 2, fake.c_pk, fake.s_pk))), 1.0)
    return substitute, evil, server


def _roster_for(server: SecAggServer, client: SecAggClient, hook: Callable[[RosterMessage, int], RosterMessage]) -> RosterMessage:
    """Client 1's roster as the attacking server sends it (client 1 advertises once the others have)."""
    server.receive_advertise(client.advertise(), 1.0)
    server.close_phase(1.0)
    return hook(server.roster_for(1), 1)


def test_trusted_verify_keys_defeat_a_server_that_resigns_substituted_keys() -> None:
    p = _params(5)
    ids = {i: _identity(p.auth, i) for i in p.indices}
    substitute, _, _ = _resigned_substitution(p, ids)
    with pytest.raises(SecAggRefused):  # client 2 itself notices its keys were replaced
        run_round(p, hooks={"roster": substitute}, identities=ids)
    # client 1 alone cannot tell without a PKI; with trusted keys it can
    substitute, _, server = _resigned_substitution(p, ids)
    naive = SecAggClient(p, 1, ids[1])
    naive.share_keys(_roster_for(server, naive, substitute))  # accepted: the limit of server-distributed keys
    substitute, _, server = _resigned_substitution(p, ids)
    trusted = {p.client_ids[i - 1]: ids[i].verify_key for i in p.indices}
    careful = SecAggClient(p, 1, ids[1], trusted_verify_keys=trusted)
    with pytest.raises(SecAggRefused) as err:
        careful.share_keys(_roster_for(server, careful, substitute))
    assert err.value.code == "bad_roster_signature"


# --------------------------------------------------------------------------- pinned keys as a set (REST: ids unknown in advance)
def test_a_pinned_key_set_defeats_the_same_substitution_and_never_names_the_key() -> None:
    p = _params(5)
    ids = {i: _identity(p.auth, i) for i in p.indices}
    pinned = frozenset(ids[i].verify_key for i in p.indices)
    substitute, evil, server = _resigned_substitution(p, ids)
    careful = SecAggClient(p, 1, ids[1], trusted_verify_keys=pinned)
    with pytest.raises(SecAggRefused) as err:
        careful.share_keys(_roster_for(server, careful, substitute))
    assert err.value.code == "bad_roster_signature"
    assert "no trusted verifying key for client 2" in str(err.value)
    assert evil.verify_key.hex() not in str(err.value) and repr(evil.verify_key) not in str(err.value)
    # the server keeps the roster's key for 2 honest but the substituted advertisement: the signature is checked
    # against the pinned key and fails
    substitute, _, server = _resigned_substitution(p, ids)
    careful = SecAggClient(p, 1, ids[1], trusted_verify_keys=pinned)
    roster = _roster_for(server, careful, substitute)
    honest_key = dataclasses.replace(roster, entries=tuple(
        dataclasses.replace(e, verify_key=ids[2].verify_key) if e.index == 2 else e for e in roster.entries))
    with pytest.raises(SecAggRefused) as err:
        careful.share_keys(honest_key)
    assert err.value.code == "bad_roster_signature" and "client 2 do not carry its signature" in str(err.value)


def test_an_honest_round_with_pinned_key_sets_gives_the_exact_sum() -> None:
    p = _params(6)
    ids = {i: _identity(p.auth, i) for i in p.indices}
    pinned = frozenset(ids[i].verify_key for i in p.indices)
    r = run_round(p, identities=ids, client_kwargs={"trusted_verify_keys": pinned})
    assert r.server.phase == Phase.DONE and r.server.result().summed == tuple(range(1, 7))
    assert_exact(r)
    assert not r.server.drops


def test_a_neighbour_whose_key_is_not_pinned_is_refused_by_index() -> None:
    p = _params(5)
    ids = {i: _identity(p.auth, i) for i in p.indices}
    pinned = frozenset(ids[i].verify_key for i in p.indices if i != 3)
    with pytest.raises(SecAggRefused) as err:  # client 1, the first to check a roster, has 3 as a neighbour
        run_round(p, identities=ids, client_kwargs={"trusted_verify_keys": pinned})
    assert err.value.code == "bad_roster_signature" and "client 3" in str(err.value)
    assert ids[3].verify_key.hex() not in str(err.value)


@pytest.mark.parametrize("pinning", ["none", "set", "mapping"])
def test_a_roster_with_one_verifying_key_for_two_members_is_refused(pinning: str) -> None:
    p = _params(5)
    ids = {i: _identity(p.auth, i) for i in p.indices}
    trusted = {"none": None, "set": frozenset(ids[i].verify_key for i in p.indices),
               "mapping": {p.client_ids[i - 1]: ids[i].verify_key for i in p.indices}}[pinning]

    def duplicate(roster: RosterMessage, i: int) -> RosterMessage:
        return dataclasses.replace(roster, entries=tuple(
            dataclasses.replace(e, verify_key=ids[2].verify_key) if e.index == 4 else e for e in roster.entries))

    with pytest.raises(SecAggRefused) as err:
        run_round(p, identities=ids, hooks={"roster": duplicate}, client_kwargs={"trusted_verify_keys": trusted})
    assert err.value.code == "bad_roster" and "clients 2 and 4 the same verifying key" in str(err.value)


def test_a_mapping_that_pins_one_key_for_two_ids_is_refused() -> None:
    p = _params(5)
    ids = {i: _identity(p.auth, i) for i in p.indices}
    trusted = {p.client_ids[i - 1]: ids[2 if i == 4 else i].verify_key for i in p.indices}
    with pytest.raises(SecAggRefused) as err:
        run_round(p, identities=ids, client_kwargs={"trusted_verify_keys": trusted})
    assert err.value.code == "bad_roster" and "same verifying key" in str(err.value)


def test_pinned_keys_refuse_an_hmac_round_and_malformed_sets() -> None:
    p = _params(5, auth=HMAC_SHA256)
    with pytest.raises(SecAggRefused) as err:  # HMAC keys are the server's: pinning would silently not apply
        SecAggClient(p, 1, _identity(p.auth, 1), trusted_verify_keys=frozenset({bytes(32)}))
    assert err.value.code == "bad_params"
    p = _params(5)
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        SecAggClient(p, 1, _identity(p.auth, 1), trusted_verify_keys={bytes(31)})


def test_a_client_refuses_a_bundle_that_withholds_a_neighbour() -> None:
    def withhold(bundle: ShareBundle, i: int) -> ShareBundle:
        return dataclasses.replace(bundle, ciphertexts=bundle.ciphertexts[1:]) if i == 1 else bundle

    with pytest.raises(SecAggRefused) as err:
        run_round(_params(5), hooks={"bundle": withhold})
    assert err.value.code == "bad_bundle"


def test_insecure_parameters_are_refused() -> None:
    p = _params(6)
    with pytest.raises(ValueError, match="strict majority"):
        dataclasses.replace(p, threshold=3)  # 3 of 6 holders is not a majority
    with pytest.raises(ValueError, match="cannot hold"):
        dataclasses.replace(p, modulus_bits=10)
    with pytest.raises(SecAggRefused):
        SecAggClient(p, 1, SigningIdentity.hmac(b"k" * 32))  # the round signs with ed25519


# --------------------------------------------------------------------------- deadlines, encoding, bytes
def test_deadlines_close_phases_and_record_who_dropped_when() -> None:
    p = _params(5)
    ids = {i: _identity(p.auth, i) for i in p.indices}
    server = SecAggServer(p, {i: ids[i].verifier() for i in p.indices}, now=100.0,
                          timeouts={"advertise_keys": 10.0, "share_keys": 5.0})
    clients = {i: SecAggClient(p, i, ids[i]) for i in p.indices}
    for i in (1, 2, 3, 4):
        server.receive_advertise(clients[i].advertise(), 101.0)
    assert server.advance(109.0) == Phase.ADVERTISE_KEYS and server.expected() == {5}
    assert server.advance(110.0) == Phase.SHARE_KEYS and server.deadline == 115.0
    assert server.drops[5] == dataclasses.replace(server.drops[5], phase="advertise_keys", reason="no_response", at=110.0)
    late = clients[5].advertise()
    with pytest.raises(SecAggRejected) as err:
        server.receive_advertise(late, 111.0)
    assert err.value.dropped
    assert p.threshold == 4  # 5 holders: 2t > 5 + 1 withstands one colluding holder
    for i in (1, 2):
        server.receive_share_keys(clients[i].share_keys(server.roster_for(i)), 112.0)
    late_keys = clients[3].share_keys(server.roster_for(3))
    with pytest.raises(SecAggRejected):  # after the deadline the message is late: the phase closed first
        server.receive_share_keys(late_keys, 116.0)
    assert (server.drops[3].phase, server.drops[3].reason, server.drops[3].at) == ("share_keys", "no_response", 116.0)
    assert server.phase == Phase.ABORTED and "only 2 clients shared their keys" in (server.abort_reason or "")


def test_messages_survive_the_wire_and_garbage_is_malformed() -> None:
    r = run_round(_params(5))
    msg = r.sent[1]
    assert MaskedInput.from_bytes(msg.to_bytes()) == msg and msg.wire_size() == len(msg.to_bytes())
    assert SecAggParams.from_bytes(r.params.to_bytes()) == r.params
    for cls in (AdvertiseKeys, ShareKeys, UnmaskResponse, RosterMessage, ShareBundle, ConsistencyCheck, ConsistencySignature,
                UnmaskRequest, MaskedInput):
        for garbage in (b"", b"{}", b"not json", b'{"type": "x", "v": 1}', b"FLSA1\n\xff\xff\xff\xff"):
            with pytest.raises(MalformedMessage):
                cls.from_bytes(garbage)
    with pytest.raises(MalformedMessage):
        AdvertiseKeys.from_bytes(b'{"type":"advertise_keys","v":1,"sender":1,"c_pk":"AAAA","s_pk":"AAAA","sig":""}')
    # the server's route: a read-only view of the decrypted body is viewed, not copied; a writable buffer is copied,
    # so changing it afterwards cannot change the payload under the digest taken of it
    wire = msg.to_bytes()
    viewed = MaskedInput.from_bytes(memoryview(wire))
    assert viewed == msg and isinstance(viewed.payload, memoryview) and viewed.payload.obj is wire
    scratch = bytearray(wire)
    copied = MaskedInput.from_bytes(memoryview(scratch))
    scratch[-1] ^= 0xFF
    assert copied == msg and copied.payload_sha256 == msg.payload_sha256
    for garbage in (b"FLSA1\n\xff\xff\xff\xff", b"FLSA", wire[:-1]):
        with pytest.raises(MalformedMessage):
            MaskedInput.from_bytes(memoryview(garbage))


def test_distributed_noise_beyond_its_bound_is_refused_not_wrapped() -> None:
    p = _params(5, l2_clip=False, noise_std=0.01, weighted=False, weight_bound=1)
    delta = p.segment("delta")
    assert delta is not None and delta.l2_clip is None and delta.bound == pytest.approx(4.1)
    big = np.zeros(DIM)
    big[0] = 5.0
    with pytest.raises(FieldOverflowError):
        encode_input(p, PlainInput(big, weight=1), np.random.default_rng(0))


def test_clipping_is_counted_in_the_sum() -> None:
    p = _params(5)
    big = np.full(DIM, 1.0)  # norm 22 > clip 4
    x, clipped = encode_input(p, PlainInput(big, weight=50), np.random.default_rng(0))
    assert clipped
    total = np.zeros_like(x)
    for _ in range(3):
        total = add_mod(total, x, p.modulus_bits)
    decoded = decode_input_sum(p, total, 3)
    assert decoded.clipped == 3
    assert np.linalg.norm(decoded.delta / 3) == pytest.approx(4.0, rel=1e-3)


def test_bytes_per_client_are_reported_per_phase() -> None:
    r = run_round(_params(6, dim=10000))
    per = r.server.bytes_per_client()
    assert set(per) == {"advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask"}
    assert per["masked_input"]["up"] == pytest.approx(10004 * r.params.modulus_bits / 8, rel=0.05)
    assert per["share_keys"]["up"] > 5 * 176  # one ciphertext per neighbour
