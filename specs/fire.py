"""FIRE: a learnable relative-position bias, a small MLP of the log-distance normalized by the query's
position, causal.

    s_ij = q_i . k_j / sqrt(d) + f_h(psi(i - j) / psi(max(L, i))),   psi(x) = log(c x + 1)

Li et al., "Functional Interpolation for Relative Positions Improves Long Context Transformers" (ICLR
2024, arXiv:2310.04418). f is one MLP per layer, 1 -> 32 (ReLU) -> one output per head; c (kept positive
as a softplus) and the threshold L are learnable too. The hidden layer is a vector over the captured
weights' last dimension: each unit is computed for every score and the dot with the head's output row
sums them, so every parameter gets gradients.
"""

import torch

import attngen as ag

HEADS, HIDDEN = 8, 32
_gen = torch.Generator().manual_seed(0)
W1 = torch.randn(HIDDEN, generator=_gen).requires_grad_()
B1 = (0.1 * torch.randn(HIDDEN, generator=_gen)).requires_grad_()
W2 = (torch.randn(HEADS, HIDDEN, generator=_gen) / HIDDEN ** 0.5).requires_grad_()
B2 = torch.zeros(HEADS, requires_grad=True)
RAW_C = torch.tensor(0.5413, requires_grad=True)  # softplus(0.5413) = 1.0
THRESHOLD = torch.tensor(16.0, requires_grad=True)


def fire(score, b, h, q_idx, kv_idx):
    c = torch.nn.functional.softplus(RAW_C)
    position = torch.log(c * (q_idx - kv_idx) + 1) / torch.log(c * torch.maximum(q_idx.float(), THRESHOLD) + 1)
    hidden = torch.relu(W1 * position + B1)
    return score + torch.dot(W2[h], hidden) + B2[h]


SPEC = ag.AttentionSpec(score_mod=fire, mask_mod=ag.masks.causal)
