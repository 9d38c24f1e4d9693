"""Property tests (hypothesis) for the server's upload path: ``ClientGateway.open_update`` of a real service.

What a registered client sends as an update body is decrypted with its session key, decoded
(fl_common/tensors/wire.py) and checked (num_samples, metrics, shape, finiteness). Whatever the
bytes, the gateway answers with an ApiError of a 4xx status (the route turns it into that HTTP
answer) or hands the driver a valid update: never another exception, which the route would turn
into a 500. The service is the real one behind a real server on loopback; only the HTTP hop is
skipped, so that hypothesis can send a few hundred bodies in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_common.crypto import Envelope
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN
from fl_common.tensors import wire
from fl_server.rest.gateway import ApiError, Authenticated, UploadLayout
from fl_server.rest.service import FederationService
from tests.e2e.harness import ScriptedClient, threaded_server, token_env
from tests.e2e.scripted_rounds import tiny_cfg

BODIES = settings(max_examples=120, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SPECS = ["none", "float16", "int8", "topk:0.1", "topk:0.5+int8"]


class Gateway:
    """A real service, one registered client, and what the gateway needs to open its uploads."""

    def __init__(self, service: FederationService, client: ScriptedClient) -> None:
        creds = client.api.creds
        assert creds is not None
        self.service, self.client = service, client
        self.auth = Authenticated(creds.client_id, creds.keys)
        self.layout = UploadLayout(service.coordinator.spec.numel)
        self.bound = service.gateway.records_bound_of(creds.client_id)

    def open(self, body: bytes, *, seal: bool = True) -> Any:
        sealed = Envelope(self.auth.keys).seal(body) if seal else body
        try:
            return self.service.gateway.open_update(self.auth, 1, sealed, self.layout)
        except ApiError as exc:
            assert 400 <= exc.status < 500 and exc.code and exc.message, (exc.status, exc.code, exc.message)  # noqa: PT017
            return None


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = token_env()
    with threaded_server(tiny_cfg(num_clients=2, num_rounds=1), tmp_path_factory.mktemp("upl") / "srv", env) as (url, service):
        yield Gateway(service, ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], "prop"))


def assert_valid(opened: Any, gw: Gateway) -> None:
    packed, update = opened
    assert isinstance(packed, bytes)
    assert update.delta.shape == (gw.layout.model_numel,) and bool(torch.isfinite(update.delta).all())
    assert isinstance(update.num_samples, int) and 1 <= update.num_samples <= gw.bound
    assert all(isinstance(v, float) and math.isfinite(v) for v in update.metrics.values())


#: what JSON can carry (the wire header refuses NaN and Infinity constants; pack() never writes them)
json_values = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | \
    st.text(max_size=8) | st.lists(st.integers(), max_size=2)


@st.composite
def metas(draw: Any) -> Any:
    """Meta dicts a client might send: mostly plausible, often not (huge, negative or boolean num_samples,
    NaN or non-numeric metrics, too many metrics, missing keys)."""
    meta: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        meta["num_samples"] = draw(st.integers(1, 100) | st.integers(-(2**65), 2**65) | json_values)
    if draw(st.booleans()):
        meta["metrics"] = draw(st.dictionaries(st.text(max_size=6), json_values | st.floats(-10, 10), max_size=40))
    if draw(st.integers(0, 5)) == 0:
        meta[draw(st.text(max_size=5))] = draw(json_values)
    return meta


@BODIES
@given(st.binary(max_size=2048), st.booleans())
def test_any_body_is_a_4xx_or_a_valid_update(gateway: Gateway, body: bytes, seal: bool) -> None:
    opened = gateway.open(body, seal=seal)
    if opened is not None:
        assert_valid(opened, gateway)


@BODIES
@given(st.data())
def test_any_update_with_any_meta_is_a_4xx_or_a_valid_update(gateway: Gateway, data: st.DataObject) -> None:
    numel = gateway.layout.model_numel
    scale = data.draw(st.sampled_from([1e-3, 1.0, 1e30, 3e38]))
    seed = data.draw(st.integers(0, 2**31))  # the blob (its size) is a function of the draws, or hypothesis cannot replay it
    vec = (torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * scale).clamp(-3e38, 3e38)
    length = data.draw(st.sampled_from([numel, numel, numel - 1, numel + 1, 0]))
    blob = wire.encode_update(vec[:length] if length <= numel else torch.cat([vec, vec[:1]]), data.draw(st.sampled_from(SPECS)),
                              data.draw(st.sampled_from(wire.COMPRESSIONS)), rng=torch.Generator().manual_seed(seed),
                              meta=data.draw(metas()))
    if data.draw(st.booleans()):  # and corrupted on top
        mutated = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 3))):
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(mutated)
    opened = gateway.open(blob)
    if opened is not None:
        assert_valid(opened, gateway)


def test_a_plausible_update_is_accepted(gateway: Gateway) -> None:
    """The properties above are not vacuous: an honest update opens."""
    vec = torch.full((gateway.layout.model_numel,), 1e-3)
    opened = gateway.open(wire.encode_update(vec, "int8", "zstd", meta={"num_samples": 10, "metrics": {"train_loss": 0.5}}))
    assert opened is not None
    assert_valid(opened, gateway)
    assert opened[1].num_samples == 10 and opened[1].metrics == {"train_loss": 0.5}
