"""Masks expanded before the update (fl_common/secagg/precompute.py) give bit-identical masked inputs to masks
computed at upload, also when a neighbour dropped after the roster (its mask is then taken out again), and the
round still unmasks to the exact sum. The real client and server state machines, messages through bytes."""

from __future__ import annotations

import numpy as np

from fl_common.secagg import Phase, PlainInput, SecAggClient, SecAggServer, SigningIdentity
from fl_common.secagg.encoding import decode_input_sum, encode_input, pack
from fl_common.secagg.field import add_mod
from fl_common.secagg.masks import mask_input
from fl_common.secagg.planning import plan_params
from fl_common.secagg.precompute import MaskPrecompute

DIM = 400


def _wire(msg):  # type: ignore[no-untyped-def]
    return type(msg).from_bytes(msg.to_bytes())


def test_precomputed_masks_are_bit_identical_and_the_round_unmasks_exactly() -> None:
    params = plan_params(round_number=5, client_ids=[f"c{i}" for i in range(6)], vector_length=DIM, clip=4.0,
                         scale_bits=16, weighted=True, weight_bound=50)
    ids = {i: SigningIdentity.generate_ed25519() for i in params.indices}
    server = SecAggServer(params, {i: ids[i].verifier() for i in params.indices}, now=0.0)
    clients = {i: SecAggClient(params, i, ids[i], rng=np.random.default_rng(100 + i)) for i in params.indices}
    rng = np.random.default_rng(7)
    inputs = {i: PlainInput(rng.uniform(-0.2, 0.2, DIM), weight=int(rng.integers(1, 51))) for i in params.indices}
    for i in params.indices:
        server.receive_advertise(_wire(clients[i].advertise()), 1.0)
    assert server.phase == Phase.SHARE_KEYS  # a phase closes by itself once everyone expected has answered
    gone = 6  # advertised, then silent: its neighbours' precomputed masks include it and must take it out again
    material = {}
    for i in params.indices:
        if i == gone:
            continue
        server.receive_share_keys(_wire(clients[i].share_keys(_wire(server.roster_for(i)))), 2.0)
        material[i] = clients[i].mask_material()
        clients[i].precomputed = MaskPrecompute(material[i]).start()
    if server.phase == Phase.SHARE_KEYS:
        server.close_phase(2.0)
    assert gone not in server.u2 and any(gone in m.pairwise_secrets for m in material.values())
    for i in material:
        bundle = _wire(server.bundle_for(i))
        sent = clients[i].masked_input(bundle, inputs[i])
        # the same input masked the ordinary way, with only the neighbours that shared keys
        x, _ = encode_input(params, inputs[i], np.random.default_rng(100 + i))
        in_sum = {v: s for v, s in material[i].pairwise_secrets.items() if v in bundle.survivors}
        expected = mask_input(x, i, material[i].self_seed, in_sum, params.modulus_bits, context=material[i].context)
        assert sent.payload == pack(expected, params.modulus_bits)  # bit for bit
        pre = clients[i].precomputed
        assert pre is not None and pre.ready()
        np.testing.assert_array_equal(pre.mask(x, set(in_sum)), expected)
        words, _ = encode_input(params, inputs[i], np.random.default_rng(100 + i), words=True)
        in_place = pre.mask(words, set(in_sum), in_place=True)  # the client's path: masked where it is
        assert in_place is words and np.array_equal(in_place, expected)
        server.receive_masked_input(_wire(sent), 3.0)
    if server.phase == Phase.MASKED_INPUT:
        server.close_phase(3.0)
    for i in material:  # the survivors sign the set the server holds (the consistency check), then unmask
        server.receive_consistency(_wire(clients[i].consistency_check(_wire(server.consistency_check_for(i)))), 3.5)
    if server.phase == Phase.CONSISTENCY_CHECK:
        server.close_phase(3.5)
    for i in material:
        server.receive_unmask(_wire(clients[i].unmask(_wire(server.unmask_request_for(i)))), 4.0)
    if server.phase == Phase.UNMASK:
        server.close_phase(4.0)
    assert server.phase == Phase.DONE
    result = server.result()
    assert set(result.summed) == set(material)
    total = np.zeros(params.vector_length, dtype=np.uint64)
    for i in result.summed:
        total = add_mod(total, encode_input(params, inputs[i], np.random.default_rng(100 + i))[0], params.modulus_bits)
    np.testing.assert_array_equal(result.sums.delta, decode_input_sum(params, total, len(result.summed)).delta)


def test_a_precompute_for_another_length_is_not_used() -> None:
    params = plan_params(round_number=1, client_ids=["a", "b", "c"], vector_length=10, clip=1.0, scale_bits=8)
    ids = {i: SigningIdentity.generate_ed25519() for i in params.indices}
    server = SecAggServer(params, {i: ids[i].verifier() for i in params.indices}, now=0.0)
    clients = {i: SecAggClient(params, i, ids[i]) for i in params.indices}
    for i in params.indices:
        server.receive_advertise(_wire(clients[i].advertise()), 1.0)
    assert server.phase == Phase.SHARE_KEYS  # a phase closes by itself once everyone expected has answered
    for i in params.indices:
        server.receive_share_keys(_wire(clients[i].share_keys(_wire(server.roster_for(i)))), 2.0)
    pre = MaskPrecompute(clients[1].mask_material()).start()
    assert pre.mask(np.zeros(3, dtype=np.uint64), set()) is None  # wrong length: the caller masks the ordinary way
    assert pre.ready()
    assert "redacted" in repr(clients[1].mask_material())
