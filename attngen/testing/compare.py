"""Error measures and the tolerance rule used against the float64 reference."""

from __future__ import annotations

import torch


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference; -inf matching -inf counts as exact."""
    actual, expected = actual.detach().double(), expected.detach().double()
    same_inf = torch.isinf(actual) & torch.isinf(expected) & (actual.sign() == expected.sign())
    if torch.isnan(actual).any() and not torch.isnan(expected).any():
        return float("inf")
    diff = torch.where(same_inf, torch.zeros_like(actual), (actual - expected).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, *,
                 baseline: torch.Tensor | None = None, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Check ``actual`` against the float64 ``expected``.

    With ``baseline`` (the same computation done in plain torch at the
    kernel's dtype), the rule is FlashAttention's: error <= 2 * baseline error
    + ``atol``. Without it: error <= ``atol + rtol * max|expected|``.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    actual, expected = actual.detach(), expected.detach()
    error = max_error(actual, expected)
    if baseline is not None:
        bound = 2 * max_error(baseline, expected) + atol
    else:
        finite = expected[torch.isfinite(expected)]
        bound = atol + rtol * (float(finite.abs().max()) if finite.numel() else 0.0)
    if not error <= bound:
        raise AssertionError(f"{name}: max error {error:.3e} exceeds the bound {bound:.3e}")
