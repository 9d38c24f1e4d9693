"""fl_common/tensors/pipeline.py: the update's wire bytes, what the server reconstructs from them, error feedback."""

from __future__ import annotations

import torch

from fl_common.tensors import spec_of
from fl_common.tensors.codecs import make_codec
from fl_common.tensors.error_feedback import ErrorFeedback
from fl_common.tensors.pipeline import pack_update, unpack_update

N = 50_000


def _delta() -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(3)) * 0.01


def test_decoded_is_what_the_server_reconstructs_from_the_bytes() -> None:
    packed = pack_update(_delta(), make_codec("int8"), "zstd", rng=torch.Generator().manual_seed(5),
                         meta={"num_samples": 7})
    server_side, meta = unpack_update(packed.data, N, max_bytes=1 << 24)
    assert meta == {"num_samples": 7}
    assert torch.equal(packed.decoded, server_side)
    assert packed.decoded is packed.decoded  # decoded once, on first use


def test_a_compressor_level_changes_the_bytes_never_the_update() -> None:
    codec = make_codec("int8")
    default = pack_update(_delta(), codec, "zstd", rng=torch.Generator().manual_seed(5))
    fast = pack_update(_delta(), codec, "zstd", rng=torch.Generator().manual_seed(5), level=1)
    again = pack_update(_delta(), codec, "zstd", rng=torch.Generator().manual_seed(5), level=1)
    assert fast.data == again.data  # the same seed gives the same bytes
    assert torch.equal(unpack_update(fast.data, N, 1 << 24)[0], unpack_update(default.data, N, 1 << 24)[0])


def test_error_feedback_remembers_what_the_codec_did_not_send() -> None:
    spec = spec_of({"w": torch.zeros(N)})
    ef = ErrorFeedback(spec)
    delta = _delta()
    packed = pack_update(delta, make_codec("topk:0.01"), "zstd", rng=None, error_feedback=ef)
    assert ef.residual is not None
    assert torch.equal(ef.residual, delta - packed.decoded)
    assert torch.equal(packed.decoded, unpack_update(packed.data, N, 1 << 24)[0])
