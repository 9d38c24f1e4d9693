"""``download_codec``: the global model goes down in float16 when asked (half the bytes), rounded exactly as the
float16 codec rounds, while the server keeps float32; the key is validated. Real server on loopback."""

from __future__ import annotations

import pytest
import torch

from fl_common.config import ConfigError
from fl_common.protocol.rest import ENV_ENROLLMENT_TOKEN
from fl_common.tensors import wire
from tests.e2e.harness import ScriptedClient, make_cfg, threaded_server, token_env

pytestmark = pytest.mark.usefixtures("small_config")  # skips cleanly when Fashion-MNIST is absent


def test_float16_download_is_the_rounded_model_in_half_the_bytes(tmp_path) -> None:
    env = token_env()
    sizes = {}
    for codec in ("float32", "float16"):
        cfg = make_cfg(num_clients=3, round_start_wait=600.0, download_codec=codec, wire_compression="none")
        with threaded_server(cfg, tmp_path / codec, env) as (url, service):
            client = ScriptedClient(url, env[ENV_ENROLLMENT_TOKEN], "d0")
            payload, _ = client.api.download_model(None, encrypted=True)
            assert payload is not None
            sizes[codec] = len(payload)
            got, _ = wire.decode_update(payload, service.coordinator.spec.numel)
            server = service.coordinator.global_vector
            want = server if codec == "float32" else server.to(torch.float16).to(torch.float32)
            assert torch.equal(got, want)
            assert server.dtype == torch.float32
    assert sizes["float16"] < 0.55 * sizes["float32"]


def test_download_codec_is_validated() -> None:
    with pytest.raises(ConfigError, match="download_codec"):
        make_cfg(download_codec="bfloat16")
