"""ALiBi: a linear penalty on distance, one slope per head, causal.

    s_ij = q_i . k_j / sqrt(d) - m_h * (i - j)

Press et al., "Train Short, Test Long: Attention with Linear Biases" (2021,
arXiv:2108.12409). The slopes are the paper's geometric sequence 2^(-8h/H).
"""

import torch

import attngen as ag

HEADS = 8
SLOPES = torch.tensor([2.0 ** (-8.0 * (h + 1) / HEADS) for h in range(HEADS)])


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * (q_idx - kv_idx)


SPEC = ag.AttentionSpec(score_mod=alibi, mask_mod=ag.masks.causal)
