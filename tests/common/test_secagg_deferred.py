"""The server state machine's deferred mode (the REST driver's: masked inputs queued under the caller's lock and
summed outside it, the unmasking run outside it) releases the very bytes the immediate mode does.

Two real servers receive the same client messages in lockstep (client keys are fresh per run, so only one set of
clients can feed both); every message a server hands out must be byte-identical between them, and so must the
released sums, with dropouts before and after the masked input (dangling pairwise masks and rebuilt self masks)."""

from __future__ import annotations

import threading

import numpy as np

from fl_common.secagg import (
    Phase,
    PlainInput,
    SecAggClient,
    SecAggServer,
    SigningIdentity,
    prepare_masked_input,
)
from fl_common.secagg.planning import plan_params

DIM = 300


def test_deferred_mode_releases_the_same_bytes_as_the_immediate_mode() -> None:
    params = plan_params(round_number=2, client_ids=[f"c{i}" for i in range(7)], vector_length=DIM, clip=4.0,
                         scale_bits=16, degree=None, auth="ed25519", weighted=True, weight_bound=50)
    ids = {i: SigningIdentity.generate_ed25519() for i in params.indices}
    verifiers = {i: ids[i].verifier() for i in params.indices}
    now_ = 1.0
    immediate = SecAggServer(params, verifiers, now=0.0)
    deferred = SecAggServer(params, verifiers, now=0.0, deferred=True)
    both = (immediate, deferred)
    clients = {i: SecAggClient(params, i, ids[i], rng=np.random.default_rng(10 + i)) for i in params.indices}
    rng = np.random.default_rng(3)
    delta = params.segment("delta")
    assert delta is not None
    inputs = {i: PlainInput(rng.uniform(-0.2, 0.2, delta.length), weight=int(rng.integers(1, 51))) for i in params.indices}
    silent_before_input, silent_after_input = 2, 5

    def same(get):  # what each server hands out: byte-identical
        a, b = (type(x).to_bytes(x) for x in (get(immediate), get(deferred)))
        assert a == b
        return get(immediate)

    for i in params.indices:
        msg = clients[i].advertise()
        for s in both:
            s.receive_advertise(msg, now_)
    for i in params.indices:
        msg = clients[i].share_keys(same(lambda s, i=i: s.roster_for(i)))
        for s in both:
            s.receive_share_keys(msg, now_)
    assert immediate.phase == deferred.phase == Phase.MASKED_INPUT
    queued: list[threading.Thread] = []
    for i in params.indices:
        if i == silent_before_input:
            continue
        msg = clients[i].masked_input(same(lambda s, i=i: s.bundle_for(i)), inputs[i])
        immediate.receive_masked_input(msg, now_)
        # as the REST driver does: unpacked before, summed after (here from other threads, concurrently)
        deferred.receive_masked_input(msg, now_, prepare_masked_input(params, msg))
        queued.append(threading.Thread(target=deferred.fold_inputs))
        queued[-1].start()
    for s in both:
        s.close_phase(2.0)  # the silent client's deadline: the phase closes without it
    for t in queued:
        t.join()
    assert immediate.phase == deferred.phase == Phase.CONSISTENCY_CHECK
    survivors = immediate.u3
    for i in survivors:
        msg = clients[i].consistency_check(same(lambda s, i=i: s.consistency_check_for(i)))
        for s in both:
            s.receive_consistency(msg, now_)
    assert immediate.phase == deferred.phase == Phase.UNMASK
    for i in immediate.u4:
        if i == silent_after_input:
            continue
        msg = clients[i].unmask(same(lambda s, i=i: s.unmask_request_for(i)))
        for s in both:
            s.receive_unmask(msg, now_)
    later = 3.0
    for s in both:
        s.close_phase(later)
    assert immediate.phase == Phase.DONE
    # deferred: the phase closed, nothing is expected any more, and nothing is released before run_unmask
    job = deferred.unmask_job
    assert job is not None and deferred.phase == Phase.UNMASK and not deferred.expected()
    deferred.drop(1, "late", later)  # a drop once the unmasking began changes nothing
    assert 1 not in deferred.drops
    assert deferred.finish_unmask(deferred.run_unmask(job), later) == Phase.DONE
    a, b = immediate.result(), deferred.result()
    assert a.summed == b.summed and silent_after_input in a.summed and silent_before_input not in a.summed
    np.testing.assert_array_equal(a.sums.delta, b.sums.delta)
    assert (a.sums.weight, a.sums.count, a.sums.clipped) == (b.sums.weight, b.sums.count, b.sums.clipped)
    assert a.responders == b.responders and a.dropped.keys() == b.dropped.keys()
