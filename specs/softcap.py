"""Tanh soft-capping of attention logits.

    s_ij = c * tanh(z_ij / c)

Used by Gemma 2 (Gemma Team, 2024, arXiv:2408.00118) with c = 50.
"""

import torch

import attngen as ag

CAP = 50.0
SPEC = ag.AttentionSpec(score_mod=lambda score, b, h, q_idx, kv_idx: CAP * torch.tanh(score / CAP),
                        mask_mod=ag.masks.causal)
