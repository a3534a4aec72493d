"""Scalable-Softmax (SSMax): softmax of scores scaled by s * log(n).

    p_ij = softmax_j(s_h * log(n) * z_ij)

n is the number of keys; s_h a learnable per-head scale. From Nakanishi,
"Scalable-Softmax Is Superior for Attention" (2025, arXiv:2501.19399): keeps
attention from flattening as the context grows.
"""

import torch

import attngen as ag

HEADS = 8
SCALE = torch.full((HEADS,), 0.4, requires_grad=True)
SPEC = ag.AttentionSpec(normalization=ag.norms.ScalableSoftmax(s=SCALE), mask_mod=ag.masks.causal)
