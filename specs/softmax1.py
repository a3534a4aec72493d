"""Softmax1, the "off-by-one" softmax: a fixed zero sink.

    p_ij = exp(s_ij) / (1 + sum_k exp(s_ik))

From Evan Miller, "Attention Is Off By One" (2023): heads may attend to
nothing, which tames activation outliers.
"""

import attngen as ag

SPEC = ag.AttentionSpec(normalization=ag.norms.OffByOne(), mask_mod=ag.masks.causal)
