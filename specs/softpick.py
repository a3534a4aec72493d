"""Softpick: a rectified softmax with exact zeros and no attention sink.

    p_ij = relu(exp(s_ij) - 1) / (sum_k |exp(s_ik) - 1| + eps),   o_i = sum_j p_ij v_j

Keys scoring at most 0 weigh exactly 0 but still count in the denominator, so
a row can attend to (almost) nothing without a sink token. From Zuhri, Fuadi
and Aji, "Softpick: No Attention Sink, No Massive Activations with Rectified
Softmax" (2025, arXiv:2504.20966).
"""

import attngen as ag

SPEC = ag.AttentionSpec(normalization=ag.norms.Softpick(), mask_mod=ag.masks.causal)
