"""Stick-breaking attention (Tan et al., 2024, "Scaling Stick-Breaking Attention: An Efficient
Implementation and In-depth Study").

    beta_ij = sigmoid(s_ij)
    p_ij = beta_ij * prod_{j < k <= i} (1 - beta_ik)

Each query breaks a unit stick starting from its nearest key: key j takes the fraction
beta_ij of what the nearer keys left. No softmax normalizer and no position embedding is
needed: recency is built in. Causal.
"""

import attngen as ag

SPEC = ag.AttentionSpec(mask_mod=ag.masks.causal, normalization=ag.norms.StickBreaking())
