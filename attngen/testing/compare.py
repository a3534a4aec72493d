"""Error measures and the tolerance rule used against the float64 reference.

The rule is FlashAttention's: a kernel's error against the float64 reference
may be at most twice the error of the same computation done in plain torch at
the kernel's dtype, plus a small floor that scales with the quantity's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The floor of the bound, relative to max(1, max |reference|), per kernel dtype.
FLOORS = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3, torch.float64: 1e-9}


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference; infinities of the same sign count as exact, a NaN on either side as inf
    (NaN against NaN too: both could be wrong alike, as 0 * inf in a gradient)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    same = torch.isinf(actual) & torch.isinf(expected) & (actual.sign() == expected.sign())
    diff = torch.where(same, torch.zeros_like(actual), (actual - expected).abs())
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max()) if diff.numel() else 0.0


def magnitude(t: torch.Tensor) -> float:
    """The largest finite absolute value of ``t`` (0 if none)."""
    finite = t.detach()[torch.isfinite(t.detach())]
    return float(finite.abs().max()) if finite.numel() else 0.0


@dataclass(frozen=True)
class Comparison:
    """One compared quantity: its max error against the float64 reference and the allowed bound."""

    name: str
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def __str__(self) -> str:
        return f"{self.name}: max error {self.error:.3e} {'<=' if self.ok else 'exceeds'} bound {self.bound:.3e}"


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, baseline: torch.Tensor | None,
            dtype: torch.dtype, floor: float | None = None) -> Comparison:
    """``actual`` against the float64 ``expected`` under the rule; ``baseline`` is the plain-torch
    computation at ``dtype`` (None: the floor alone)."""
    if actual.shape != expected.shape:
        return Comparison(f"{name} (shape {tuple(actual.shape)} != {tuple(expected.shape)})", float("inf"), 0.0)
    if torch.isnan(expected).any():  # the spec is NaN there (0 * inf?): nothing can match it, not even a NaN
        return Comparison(f"{name} (NaN in the float64 reference)", math.inf, 0.0)
    floor = FLOORS.get(dtype, 1e-3) if floor is None else floor
    bound = floor * max(1.0, magnitude(expected))
    if baseline is not None:
        bound += 2 * max_error(baseline, expected)
    return Comparison(name, max_error(actual, expected), bound)


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, *,
                 baseline: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 floor: float | None = None) -> None:
    """Raise ``AssertionError`` unless ``actual`` is within the rule's bound of the float64 ``expected``."""
    result = compare(name, actual, expected, baseline, dtype or actual.dtype, floor)
    if not result.ok:
        raise AssertionError(str(result))
