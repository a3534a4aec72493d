"""Top-k attention (Gupta et al., 2021, "Memory-efficient Transformers via Top-k Attention").

    p_ij = softmax_j(s_ij) over the keys j with s_ij >= s_i(k),   0 elsewhere

where s_i(k) is row i's k-th largest score (keys tied with it stay): each query attends to its
k best-scoring keys alone. Causal, k = 8; any normalization of logits takes top_k the same way.
"""

import attngen as ag

SPEC = ag.AttentionSpec(mask_mod=ag.masks.causal, top_k=8)
