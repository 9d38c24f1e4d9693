"""Secure-aggregation primitives (SecAgg, Bonawitz et al. 2017; SecAgg+, Bell et al. 2020).

One job per module: ``field`` (fixed-point encoding into Z_{2^b}), ``prg`` (ChaCha20 seed
expansion), ``masks`` (pairwise/self masks and their removal), ``shamir`` (t-of-n sharing of
seeds and keys), ``graph`` (the SecAgg+ neighbour graph and its parameters). The round state
machine (key advertisement, share exchange, unmasking) is built on top of these elsewhere.
"""

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
from fl_common.secagg.graph import GraphParams, build_graph, choose_graph_params, failure_bound
from fl_common.secagg.masks import mask_input, pairwise_mask, pairwise_seed, self_mask, unmask_sum
from fl_common.secagg.prg import SEED_LEN, derive_prg_key, expand_seed
from fl_common.secagg.shamir import PRIME, Share, ShareError, reconstruct, split_secret

__all__ = [
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
