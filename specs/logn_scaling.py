"""Log-n attention scaling for length extrapolation: queries past the training length sharpen.

    s_ij = z_ij * max(1, log(i + 1) / log(L_train))

The "logn" scaling of Qwen's long-context inference (and of Chiang and Cholak, "Overcoming a
Theoretical Limitation of Self-Attention", 2022, arXiv:2202.12172): each query's logits grow with
the log of its position once it passes the training length L_train, here 32.
"""

import math

import torch

import attngen as ag

TRAIN_LENGTH = 32


def logn(score, b, h, q_idx, kv_idx):
    return score * torch.clamp(torch.log(q_idx + 1.0) / math.log(TRAIN_LENGTH), min=1.0)


SPEC = ag.AttentionSpec(score_mod=logn, mask_mod=ag.masks.causal)
