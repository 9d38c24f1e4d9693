"""Model parameters as flat vectors, and the wire codecs that carry them."""

from fl_common.tensors.codecs import Codec, EncodedUpdate, available_codecs, make_codec
from fl_common.tensors.error_feedback import ErrorFeedback
from fl_common.tensors.flat import ParamSpec, flatten, spec_of, unflatten
from fl_common.tensors.wire import WireFormatError, decode_update, encode_update, pack, unpack

__all__ = [
    "ParamSpec",
    "flatten",
    "unflatten",
    "spec_of",
    "Codec",
    "EncodedUpdate",
    "make_codec",
    "available_codecs",
    "WireFormatError",
    "pack",
    "unpack",
    "encode_update",
    "decode_update",
    "ErrorFeedback",
]
