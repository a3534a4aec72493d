"""Helpers for testing attention kernels against the float64 reference."""

from .compare import assert_close, max_error
from .reference_check import Comparison, compare_with_reference

__all__ = ["Comparison", "assert_close", "compare_with_reference", "max_error"]
