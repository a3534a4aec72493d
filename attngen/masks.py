"""Mask combinators: plain ``mask_mod(b, h, q_idx, kv_idx) -> bool`` functions.

Every mask here is a :class:`Mask`, which is callable like any mask_mod and
combines with ``&``, ``|`` and ``~`` (also with plain functions). Indices are
absolute positions, as in FlexAttention: with Lq != Lk, ``causal`` lets query
``i`` see keys ``0..i``.
"""

from __future__ import annotations

from typing import Callable

import torch

MaskFn = Callable[..., object]


class Mask:
    """A named mask_mod that composes with ``&``, ``|`` and ``~``."""

    def __init__(self, fn: MaskFn, name: str):
        self.fn = fn
        self.name = name

    def __call__(self, b, h, q_idx, kv_idx):
        return self.fn(b, h, q_idx, kv_idx)

    def __and__(self, other: MaskFn) -> Mask:
        return Mask(lambda b, h, q, k: self(b, h, q, k) & other(b, h, q, k), f"({self.name} & {_name(other)})")

    def __or__(self, other: MaskFn) -> Mask:
        return Mask(lambda b, h, q, k: self(b, h, q, k) | other(b, h, q, k), f"({self.name} | {_name(other)})")

    __rand__ = __and__
    __ror__ = __or__

    def __invert__(self) -> Mask:
        return Mask(lambda b, h, q, k: ~self(b, h, q, k), f"~{self.name}")

    def __repr__(self) -> str:
        return self.name


def _name(fn: MaskFn) -> str:
    return fn.name if isinstance(fn, Mask) else getattr(fn, "__name__", repr(fn))


causal = Mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, "causal")
causal.__doc__ = "Query i sees keys 0..i."


def sliding_window(left: int, right: int = 0) -> Mask:
    """Query i sees keys i-left .. i+right (right=0: a causal window of left+1 keys)."""
    if left < 0 or right < 0:
        raise ValueError(f"sliding_window: left and right must be >= 0, got left={left}, right={right}")
    return Mask(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx <= left) & (kv_idx - q_idx <= right),
                f"sliding_window({left}, {right})")


def prefix_lm(prefix: int | torch.Tensor) -> Mask:
    """Keys before ``prefix`` are seen by every query, the rest causally.

    ``prefix`` is an int or a per-batch integer tensor of shape [B].
    """
    if isinstance(prefix, torch.Tensor):
        return Mask(lambda b, h, q_idx, kv_idx: (kv_idx < prefix[b]) | (q_idx >= kv_idx), "prefix_lm(tensor)")
    return Mask(lambda b, h, q_idx, kv_idx: (kv_idx < prefix) | (q_idx >= kv_idx), f"prefix_lm({prefix})")


def document(doc_ids: torch.Tensor) -> Mask:
    """Queries see only keys of the same document; ``doc_ids`` is [B, L] (or [L]) integer ids."""
    if doc_ids.dim() == 1:
        return Mask(lambda b, h, q_idx, kv_idx: doc_ids[q_idx] == doc_ids[kv_idx], "document")
    return Mask(lambda b, h, q_idx, kv_idx: doc_ids[b, q_idx] == doc_ids[b, kv_idx], "document")
