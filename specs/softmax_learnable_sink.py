"""Softmax with a learnable attention sink per head.

    p_ij = exp(s_ij) / (exp(sink_h) + sum_k exp(s_ik))

The sink is a logit attached to no value, so a head can put mass "nowhere".
Learnable per-head sinks are used by OpenAI's gpt-oss models (2025); the
phenomenon they model is described by Xiao et al., "Efficient Streaming
Language Models with Attention Sinks" (2023, arXiv:2309.17453). ``SINK`` is
the trainable parameter: its gradient comes out of the backward kernels.
"""

import torch

import attngen as ag

HEADS = 8
SINK = torch.zeros(HEADS, requires_grad=True)
SPEC = ag.AttentionSpec(normalization=ag.norms.Softmax(sink=SINK), mask_mod=ag.masks.causal)
