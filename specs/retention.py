"""Retention (Sun et al., 2023, "Retentive Network"), as in RetNet's parallel/chunkwise forms.

    o_i = sum_{j <= i} gamma_h ** (i - j) (q_i . k_j / sqrt(d)) v_j
    gamma_h = 1 - 2 ** (-5 - h)      (one decay per head)

No feature map and no normalizer (RetNet applies GroupNorm to the output outside).
The rotary (xPos) part of RetNet is applied to q and k before the call.
"""

import torch

import attngen as ag

HEADS = 8
SPEC = ag.LinearAttentionSpec(feature_map="identity", normalize=False,
                              decay=1 - 2.0 ** (-5 - torch.arange(HEADS, dtype=torch.float32)))
