"""Polynomial attention: an even power of the scores in place of exp, normalized per row.

    p_ij = s_ij^4 / (sum_k s_ik^4 + eps),   o_i = sum_j p_ij v_j

As in Kacham, Mirrokni and Zhong, "PolySketchFormer: Fast Transformers via
Sketching Polynomial Kernels" (2023, arXiv:2310.01655), whose exact degree-4
kernel this is (before sketching it into linear attention); causal.
"""

import attngen as ag

SPEC = ag.AttentionSpec(normalization=ag.norms.Normalized(lambda s: s ** 4), mask_mod=ag.masks.causal)
