"""Adaptively sparse attention: alpha-entmax with a learnable alpha per head (Correia, Niculae &
Martins, 2019, "Adaptively Sparse Transformers", arXiv:1909.00015).

    p_ij = [(alpha_h - 1) s_ij - tau_i]_+ ** (1 / (alpha_h - 1)),   tau_i such that sum_j p_ij = 1

Each head learns where it sits between softmax (alpha -> 1, dense) and sparsemax (alpha = 2):
the backward kernels also return d loss / d alpha_h, through the threshold's dependence on alpha.
``ALPHA`` must stay in (1, 2] (a CPU call checks it; on a GPU an out-of-range head's outputs are
NaN): build the spec from ``1 + torch.sigmoid(a)`` at each step (a new spec over new tensors reuses
the compiled kernels), or clamp ``ALPHA`` after each optimizer step.
"""

import torch

import attngen as ag

HEADS = 8
ALPHA = torch.linspace(1.1, 2.0, HEADS).requires_grad_()
SPEC = ag.AttentionSpec(normalization=ag.norms.Entmax(alpha=ALPHA), mask_mod=ag.masks.causal)
