"""The framing of a secure round's upload: clear DP metrics next to the MaskedInput bytes, nothing else."""

from __future__ import annotations

import struct

import pytest

from fl_common.protocol.rest import MASKED_UPLOAD_MAGIC, pack_masked_upload, unpack_masked_upload


def test_a_masked_upload_round_trips_its_metrics_and_bytes() -> None:
    body = pack_masked_upload(b"FLSA1\nmasked bytes", {"dp_steps": 12, "dp_sample_rate": 0.125})
    metrics, masked = unpack_masked_upload(body)
    assert masked == b"FLSA1\nmasked bytes" and metrics == {"dp_sample_rate": 0.125, "dp_steps": 12.0}


@pytest.mark.parametrize("body", [
    b"FLUP not a masked upload",
    MASKED_UPLOAD_MAGIC + b"\x00",
    MASKED_UPLOAD_MAGIC + struct.pack(">I", 10**6) + b"{}",
    MASKED_UPLOAD_MAGIC + struct.pack(">I", 4) + b"nope",
    MASKED_UPLOAD_MAGIC + struct.pack(">I", 21) + b'{"metrics":{"a":"x"}}',
    MASKED_UPLOAD_MAGIC + struct.pack(">I", 22) + b'{"metrics":{"a":true}}',
    MASKED_UPLOAD_MAGIC + struct.pack(">I", 2) + b"[]",
])
def test_anything_else_is_refused_with_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        unpack_masked_upload(body)


def test_the_header_is_bounded() -> None:
    with pytest.raises(ValueError):
        pack_masked_upload(b"", {f"m{i}": float(i) for i in range(1000)})
