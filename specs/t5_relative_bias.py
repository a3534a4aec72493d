"""T5's relative position bias: a learnable scalar per head and bucket of the offset kv_idx - q_idx.

    s_ij = q_i . k_j / sqrt(d) + bias[h, bucket(j - i)]

Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
(2020, arXiv:1910.10683). Offsets below ``max_distance / 8`` (per sign) get a bucket each, larger
ones share logarithmically wider buckets up to ``max_distance``. ``t5_bucket`` is written with the
conversions PyTorch ports use (``.to(torch.long)``, ``.float()``, ``torch.full_like``, ``torch.min``
of two tensors), which attngen traces as torch computes them; ``BIAS`` learns through the backward
kernels.
"""

import math

import torch

import attngen as ag

HEADS = 8
BIAS = torch.zeros(HEADS, 32, requires_grad=True)


def t5_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    buckets = 0
    if bidirectional:  # half of the buckets for keys after the query
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        distance = torch.abs(relative_position)
    else:
        distance = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    if_large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                            * (num_buckets - max_exact)).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return buckets + torch.where(is_small, distance, if_large)


def t5_bias(score, b, h, q_idx, kv_idx):
    return score + BIAS[h, t5_bucket(kv_idx - q_idx)]


SPEC = ag.AttentionSpec(score_mod=t5_bias)
