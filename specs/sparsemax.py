"""Sparsemax attention (Martins & Astudillo, 2016, "From Softmax to Sparsemax").

    p_ij = [s_ij - tau_i]_+,   tau_i such that sum_j p_ij = 1

the Euclidean projection of each row of scores onto the probability simplex:
keys below the row's threshold get exactly zero weight. Causal.
"""

import attngen as ag

SPEC = ag.AttentionSpec(mask_mod=ag.masks.causal, normalization=ag.norms.Sparsemax())
