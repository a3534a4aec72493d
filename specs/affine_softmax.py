"""Affine-scaled softmax: p = alpha * softmax(s) + beta over the kept keys.

From Bae et al., "Affine-Scaled Attention: Towards Flexible and Stable
Transformer Attention" (2026, arXiv:2602.23057), which relaxes the unit-sum
constraint of softmax. The paper makes alpha and beta input-dependent; here
they are learnable per-head parameters.
"""

import torch

import attngen as ag

HEADS = 8
ALPHA = torch.ones(HEADS, requires_grad=True)
BETA = torch.zeros(HEADS, requires_grad=True)
SPEC = ag.AttentionSpec(normalization=ag.norms.AffineSoftmax(alpha=ALPHA, beta=BETA), mask_mod=ag.masks.causal)
