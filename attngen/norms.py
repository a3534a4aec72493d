"""The normalization applied to each row of scores.

Only the softmax lives here for now; the other members of the family
(sinks, sigmoid, ReLU^p, ...) plug into the same templates later.
"""

from __future__ import annotations

from dataclasses import dataclass


class Normalization:
    """Base class of everything accepted as ``AttentionSpec(normalization=...)``."""


@dataclass(frozen=True)
class Softmax(Normalization):
    """``p_ij = exp(s_ij) / sum_k exp(s_ik)`` over the unmasked keys of row i."""
