"""Differential attention (Ye et al., 2024, "Differential Transformer").

    q = [Q1 | Q2], k = [K1 | K2] (halves of the head dim)
    out = (softmax(Q1 K1^T / sqrt(d)) - lambda_h * softmax(Q2 K2^T / sqrt(d))) V

The difference of two softmaxes cancels attention noise common to both; lambda is
learnable per head. Causal. (The paper's GroupNorm and (1 - lambda_init) scaling of
the output are applied outside the attention call.)
"""

import torch

import attngen as ag

LAMBDA = torch.full((8,), 0.8, requires_grad=True)
SPEC = ag.AttentionSpec(mask_mod=ag.masks.causal, differential=LAMBDA)
