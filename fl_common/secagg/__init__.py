"""Secure-aggregation primitives (SecAgg, Bonawitz et al. 2017; SecAgg+, Bell et al. 2020).

One job per module: ``field`` (fixed-point encoding into Z_{2^b}), ``prg`` (AES-256-CTR seed
expansion), ``masks`` (pairwise/self masks and their removal), ``shamir`` (t-of-n sharing of
seeds and keys), ``graph`` (the SecAgg+ neighbour graph and its parameters).

The protocol on top of them, transport free: ``auth`` (Ed25519 / HMAC message signatures),
``messages`` (round parameters and the messages of the four phases, with byte encodings),
``encoding`` (a client's update, weight and counters <-> one field vector), ``client`` and
``server`` (the two state machines: advertise keys, share keys, masked input, consistency check,
unmask).
"""

from fl_common.secagg.auth import ED25519, HMAC_SHA256, SigningIdentity, Verifier
from fl_common.secagg.client import SecAggClient
from fl_common.secagg.encoding import DecodedSum, PlainInput
from fl_common.secagg.field import (
    FieldOverflowError,
    FixedPointSpec,
    add_mod,
    decode_sum,
    encode,
    max_level,
    neg_mod,
    required_modulus_bits,
    sub_mod,
)
from fl_common.secagg.graph import (
    GraphParams,
    build_graph,
    choose_graph_params,
    failure_bound,
)
from fl_common.secagg.masks import (
    mask_input,
    mask_words,
    pairwise_mask,
    pairwise_seed,
    self_mask,
    unmask_sum,
)
from fl_common.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    ConsistencySignature,
    MalformedMessage,
    MaskedInput,
    RosterMessage,
    SecAggAborted,
    SecAggError,
    SecAggParams,
    SecAggRefused,
    SecAggRejected,
    Segment,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fl_common.secagg.prg import SEED_LEN, derive_prg_key, expand_seed
from fl_common.secagg.server import DropRecord, Phase, PreparedInput, SecAggResult, SecAggServer, prepare_masked_input
from fl_common.secagg.shamir import PRIME, Share, ShareError, reconstruct, split_secret

__all__ = [
    "ED25519",
    "HMAC_SHA256",
    "SigningIdentity",
    "Verifier",
    "SecAggClient",
    "SecAggServer",
    "SecAggResult",
    "DropRecord",
    "PreparedInput",
    "prepare_masked_input",
    "Phase",
    "PlainInput",
    "DecodedSum",
    "AdvertiseKeys",
    "ConsistencyCheck",
    "ConsistencySignature",
    "MalformedMessage",
    "MaskedInput",
    "RosterMessage",
    "SecAggAborted",
    "SecAggError",
    "SecAggParams",
    "SecAggRefused",
    "SecAggRejected",
    "Segment",
    "ShareBundle",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "FieldOverflowError",
    "FixedPointSpec",
    "add_mod",
    "decode_sum",
    "encode",
    "max_level",
    "neg_mod",
    "required_modulus_bits",
    "sub_mod",
    "GraphParams",
    "build_graph",
    "choose_graph_params",
    "failure_bound",
    "mask_input",
    "mask_words",
    "pairwise_mask",
    "pairwise_seed",
    "self_mask",
    "unmask_sum",
    "SEED_LEN",
    "derive_prg_key",
    "expand_seed",
    "PRIME",
    "Share",
    "ShareError",
    "reconstruct",
    "split_secret",
]
