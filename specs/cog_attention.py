"""Cog attention: a signed softmax, so that keys can weigh negatively.

    p_ij = sign(s_ij) exp(|s_ij|) / sum_k exp(|s_ik|),   o_i = sum_j p_ij v_j

A key's weight grows with its score's magnitude and takes its sign: strongly
negative scores subtract their values from the output. From Lv et al., "More
Expressive Attention with Negative Weights" (2024, arXiv:2411.07176); causal.
"""

import attngen as ag

SPEC = ag.AttentionSpec(normalization=ag.norms.SignedSoftmax(), mask_mod=ag.masks.causal)
