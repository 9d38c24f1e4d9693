"""Model parameters as flat vectors, and the wire codecs that carry them."""

from fl_common.tensors.flat import ParamSpec, flatten, unflatten, spec_of
from fl_common.tensors.codecs import Codec, EncodedUpdate, make_codec, available_codecs
from fl_common.tensors.wire import WireFormatError, pack, unpack, encode_update, decode_update
from fl_common.tensors.error_feedback import ErrorFeedback

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
