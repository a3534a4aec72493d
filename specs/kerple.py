"""KERPLE (logarithmic variant): a learnable log-distance penalty, two positive parameters per head, causal.

    s_ij = q_i . k_j / sqrt(d) - r1_h * log(1 + r2_h * (i - j))

Chi et al., "KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation" (2022,
arXiv:2205.09921). r1 and r2 are kept positive as softplus of raw parameters, initialized as the
paper's r1 = 1, r2 = 1/2 per head; both get gradients.
"""

import torch

import attngen as ag

HEADS = 8
RAW_R1 = torch.full((HEADS,), 0.5413, requires_grad=True)   # softplus(0.5413) = 1.0
RAW_R2 = torch.full((HEADS,), -0.4328, requires_grad=True)  # softplus(-0.4328) = 0.5


def kerple_log(score, b, h, q_idx, kv_idx):
    r1 = torch.nn.functional.softplus(RAW_R1[h])
    r2 = torch.nn.functional.softplus(RAW_R2[h])
    return score - r1 * torch.log1p(r2 * (q_idx - kv_idx))


SPEC = ag.AttentionSpec(score_mod=kerple_log, mask_mod=ag.masks.causal)
