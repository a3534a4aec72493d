"""Forgetting Transformer: softmax attention with a forget gate, causal.

    s_ij = q_i . k_j / sqrt(d) + sum_{j < l <= i} log f_l,    f_l = sigmoid(w_f . x_l + b_f) per head

Lin et al., "Forgetting Transformer: Softmax Attention with a Forget Gate" (ICLR 2025,
arXiv:2503.02130). The sum is a difference of running sums F = cumsum(log f), read at the query and at
the key, so the mod is two loads and a subtraction. Here the log gates are a learnable [batch, heads,
length] tensor for one batch entry of up to 64 tokens; in a model they come from the layer's input at
every step (a new spec per step with the new F: a compile-cache hit of about 1 ms), and their gradients
flow through the cumulative sum back to the gate's projection.
"""

import torch

import attngen as ag

HEADS, MAX_LEN = 8, 64
LOG_FORGET = torch.nn.functional.logsigmoid(torch.randn(1, HEADS, MAX_LEN) + 2.0).detach().requires_grad_()
F = LOG_FORGET.cumsum(-1)


def forgetting(score, b, h, q_idx, kv_idx):
    return score + F[b, h, q_idx] - F[b, h, kv_idx]


SPEC = ag.AttentionSpec(score_mod=forgetting, mask_mod=ag.masks.causal)
