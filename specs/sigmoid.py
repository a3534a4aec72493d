"""Sigmoid attention with a -log(n) bias.

    p_ij = sigmoid(s_ij - log n),   o_i = sum_j p_ij v_j     (no row normalization)

n is the number of keys. From Ramapuram et al., "Theory, Analysis, and Best
Practices for Sigmoid Self-Attention" (2024, arXiv:2409.04431), which uses
b = -log(n) to keep the output scale of early training close to softmax's.
"""

import attngen as ag

SPEC = ag.AttentionSpec(normalization=ag.norms.Sigmoid(bias="-log n"), mask_mod=ag.masks.causal)
