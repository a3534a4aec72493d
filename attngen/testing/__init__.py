"""Helpers for testing attention kernels against the float64 reference."""

from .compare import assert_close, max_error

__all__ = ["assert_close", "max_error"]
