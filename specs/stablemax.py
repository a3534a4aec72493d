"""StableMax: softmax with exp replaced by a function that grows linearly, not exponentially.

    g(x) = x + 1 for x >= 0,  1 / (1 - x) for x < 0
    p_ij = g(s_ij) / (sum_k g(s_ik) + eps),   o_i = sum_j p_ij v_j

From Prieto, Barsbey, Mediano and Birdal, "Grokking at the Edge of Numerical
Stability" (2025, arXiv:2501.04697), who introduce it to keep training away
from softmax's floating-point saturation; here in attention, causal. g is
positive and g'/g is at most 1, as Normalized's backward wants.
"""

import torch

import attngen as ag


def stable(s):
    return torch.where(s >= 0, s + 1, 1 / (1 - torch.clamp(s, max=0.0)))


SPEC = ag.AttentionSpec(normalization=ag.norms.Normalized(stable), mask_mod=ag.masks.causal)
