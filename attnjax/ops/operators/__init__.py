"""Attention operators as pure functions on `[B, T, H, D]` (see each module's docstrings)."""

from attnjax.ops.operators.aaren import AarenState, aaren_attention, aaren_init_state, aaren_step
from attnjax.ops.operators.entropy import (attention_entropy, entropy_regularizer, head_entropy,
                                           probe_attention_weights, softmax_attention_weights)
from attnjax.ops.operators.flashbias import (alibi_factors, alibi_key_factors, flashbias_attention,
                                             lowrank_bias_factors)
from attnjax.ops.operators.heads import (diff_lambda, diff_lambda_init, differential_attention,
                                         mixture_of_heads_attention, moh_router,
                                         routed_heads_attention)
from attnjax.ops.operators.scorefns import (affine_scaled_attention, gated_attention, lssa_attention,
                                            lssa_weights, sigmoid_attention,
                                            sigmoid_attention_weights)
from attnjax.ops.operators.cca import (cca_mask, cca_positions, cca_ring_index, cca_token_positions,
                                       cca_visibility)
from attnjax.ops.operators.gaam import gaam_weights, gaussian_adaptive_attention
from attnjax.ops.operators.pooling import efficient_probe, lama_pool
from attnjax.ops.operators.structured import (dha_attention, dha_fuse_heads, gpsa_attention,
                                              gpsa_local_init, grid_offsets,
                                              hierarchical_attention,
                                              hierarchical_attention_weights, moda_attention,
                                              relative_attention, reversed_attention,
                                              reversed_attention_weights, sinusoid)

__all__ = [
    "AarenState", "aaren_attention", "aaren_init_state", "aaren_step", "affine_scaled_attention",
    "alibi_factors", "alibi_key_factors", "attention_entropy", "cca_mask", "cca_positions",
    "cca_ring_index", "cca_token_positions", "cca_visibility", "dha_attention", "dha_fuse_heads",
    "diff_lambda", "diff_lambda_init", "differential_attention", "efficient_probe",
    "entropy_regularizer", "flashbias_attention", "gaam_weights", "gated_attention",
    "gaussian_adaptive_attention", "gpsa_attention", "gpsa_local_init", "grid_offsets",
    "head_entropy", "hierarchical_attention", "hierarchical_attention_weights", "lama_pool",
    "lowrank_bias_factors", "lssa_attention", "lssa_weights", "mixture_of_heads_attention",
    "moda_attention", "moh_router", "probe_attention_weights", "relative_attention",
    "reversed_attention", "reversed_attention_weights", "routed_heads_attention",
    "sigmoid_attention", "sigmoid_attention_weights", "sinusoid", "softmax_attention_weights"
]
