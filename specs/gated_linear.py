"""Gated linear attention with scalar data-dependent decays (Mamba-2 / GLA-style gates per token and head).

    G_i = sum_{t <= i} log_decay_t          (log_decay = logsigmoid(x W_g), <= 0)
    o_i = sum_{j <= i} exp(G_i - G_j) (q_i . k_j / sqrt(d)) v_j

Each call passes ``log_decay=`` [batch, heads, seq_len]; its gradient is computed.
"""

import attngen as ag

SPEC = ag.LinearAttentionSpec(feature_map="identity", decay="gated", normalize=False)
