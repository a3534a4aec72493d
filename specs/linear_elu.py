"""Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs").

    phi(x) = elu(x) + 1
    o_i = sum_{j <= i} phi(q_i) . phi(k_j) v_j / sum_{j <= i} phi(q_i) . phi(k_j)

Causal; O(L) time and a constant-size state for decoding (attn.step).
"""

import attngen as ag

SPEC = ag.LinearAttentionSpec(feature_map="elu+1")
