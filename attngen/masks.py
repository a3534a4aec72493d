"""Mask combinators: plain ``mask_mod(b, h, q_idx, kv_idx) -> bool`` functions.

Every mask here is a :class:`Mask`, which is callable like any mask_mod and
combines with ``&``, ``|`` and ``~`` (also with plain functions). Indices are
absolute positions, as in FlexAttention: with Lq != Lk, ``causal`` lets query
``i`` see keys ``0..i``.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from .scalars import integer, sizes

MaskFn = Callable[..., object]


def _made_by_its_call(make_mask):
    """``make_mask``'s masks pickle as the call that made them (their functions are closures)."""

    @functools.wraps(make_mask)
    def make(*args, **kwargs) -> Mask:
        mask = make_mask(*args, **kwargs)
        mask.made_by = functools.partial(make, *args, **kwargs)
        return mask
    return make


class Mask:
    """A named mask_mod that composes with ``&``, ``|`` and ``~``. It pickles as the call that made it
    (``made_by``, set by the library's mask factories and combinators; else as ``Mask(fn, name)``, for a
    module-level fn)."""

    def __init__(self, fn: MaskFn, name: str):
        self.fn = fn
        self.name = name
        self.made_by = None

    def __call__(self, b, h, q_idx, kv_idx):
        return self.fn(b, h, q_idx, kv_idx)

    @_made_by_its_call
    def __and__(self, other: MaskFn) -> Mask:
        return Mask(lambda b, h, q, k: self(b, h, q, k) & other(b, h, q, k), f"({self.name} & {_name(other)})")

    @_made_by_its_call
    def __or__(self, other: MaskFn) -> Mask:
        return Mask(lambda b, h, q, k: self(b, h, q, k) | other(b, h, q, k), f"({self.name} | {_name(other)})")

    __rand__ = __and__
    __ror__ = __or__

    @_made_by_its_call
    def __invert__(self) -> Mask:
        return Mask(lambda b, h, q, k: ~self(b, h, q, k), f"~{self.name}")

    def __reduce__(self):
        return (self.made_by, ()) if self.made_by else (Mask, (self.fn, self.name))

    def __repr__(self) -> str:
        return self.name


def _name(fn: MaskFn) -> str:
    return fn.name if isinstance(fn, Mask) else getattr(fn, "__name__", repr(fn))


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


causal = Mask(_causal, "causal")
causal.__doc__ = "Query i sees keys 0..i."


@_made_by_its_call
def sliding_window(left: int, right: int = 0) -> Mask:
    """Query i sees keys i-left .. i+right (right=0: a causal window of left+1 keys)."""
    left, right = sizes("sliding_window", 0, left=left, right=right)
    return Mask(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx <= left) & (kv_idx - q_idx <= right),
                f"sliding_window({left}, {right})")


@_made_by_its_call
def prefix_lm(prefix: int | torch.Tensor) -> Mask:
    """Keys before ``prefix`` are seen by every query, the rest causally.

    ``prefix`` is an int or a per-batch integer tensor of shape [B].
    """
    if integer(prefix) is None:
        _integers("prefix_lm", "prefix", prefix, (1,), "[B] or an int")
        return Mask(lambda b, h, q_idx, kv_idx: (kv_idx < prefix[b]) | (q_idx >= kv_idx), "prefix_lm(tensor)")
    [prefix] = sizes("prefix_lm", 0, prefix=prefix)
    return Mask(lambda b, h, q_idx, kv_idx: (kv_idx < prefix) | (q_idx >= kv_idx), f"prefix_lm({prefix})")


@_made_by_its_call
def document(doc_ids: torch.Tensor) -> Mask:
    """Queries see only keys of the same document; ``doc_ids`` is [B, L] (or [L]) integer ids."""
    if _integers("document", "doc_ids", doc_ids, (1, 2), "[B, L] or [L]").dim() == 1:
        return Mask(lambda b, h, q_idx, kv_idx: doc_ids[q_idx] == doc_ids[kv_idx], "document")
    return Mask(lambda b, h, q_idx, kv_idx: doc_ids[b, q_idx] == doc_ids[b, kv_idx], "document")


@_made_by_its_call
def chunked(size: int) -> Mask:
    """Queries see only keys of their own chunk of ``size`` positions (local, non-causal)."""
    [size] = sizes("chunked", 1, size=size)
    return Mask(lambda b, h, q_idx, kv_idx: q_idx // size == kv_idx // size, f"chunked({size})")


@_made_by_its_call
def block_causal(block: int) -> Mask:
    """Causal between blocks of ``block`` positions, full inside a block (block diffusion)."""
    [block] = sizes("block_causal", 1, block=block)
    return Mask(lambda b, h, q_idx, kv_idx: kv_idx // block <= q_idx // block, f"block_causal({block})")


@_made_by_its_call
def dilated_sliding_window(window: int, dilation: int) -> Mask:
    """Causal window of ``window`` keys spaced ``dilation`` apart: q - kv in {0, d, ..., (window-1) d}."""
    window, dilation = sizes("dilated_sliding_window", 1, window=window, dilation=dilation)
    return Mask(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx >= 0) & (q_idx - kv_idx < window * dilation)
                & ((q_idx - kv_idx) % dilation == 0), f"dilated_sliding_window({window}, {dilation})")


@_made_by_its_call
def strided(stride: int) -> Mask:
    """Causal keys whose distance to the query is a multiple of ``stride`` (Sparse Transformer)."""
    [stride] = sizes("strided", 1, stride=stride)
    return Mask(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & ((q_idx - kv_idx) % stride == 0), f"strided({stride})")


@_made_by_its_call
def global_tokens(n: int) -> Mask:
    """The first ``n`` positions see and are seen by every position; combine with a local mask by ``|``."""
    [n] = sizes("global_tokens", 1, n=n)
    return Mask(lambda b, h, q_idx, kv_idx: (kv_idx < n) | (q_idx < n), f"global_tokens({n})")


@_made_by_its_call
def padding(lengths: int | torch.Tensor) -> Mask:
    """Keys at or past ``lengths[b]`` (an integer tensor of shape [B], or one int for every batch entry)
    are padding."""
    if integer(lengths) is None:
        _integers("padding", "lengths", lengths, (1,), "[B] or an int")
        return Mask(lambda b, h, q_idx, kv_idx: kv_idx < lengths[b], "padding")
    [lengths] = sizes("padding", 0, lengths=lengths)
    return Mask(lambda b, h, q_idx, kv_idx: kv_idx < lengths, f"padding({lengths})")


def _window_1d(q, k, size: int, kernel: int, dilation: int):
    """NATTEN's 1-D neighborhood: ``kernel`` keys of the query's dilation group, centred on it
    and shifted inward at the borders so every query keeps ``kernel`` keys."""
    group = q % dilation
    group_size = (size - group + dilation - 1) // dilation
    start = torch.clamp(q // dilation - kernel // 2, min=0)
    start = torch.minimum(start, torch.clamp(group_size - kernel, min=0))
    position = k // dilation
    return (k % dilation == group) & (position >= start) & (position < start + kernel)


@_made_by_its_call
def neighborhood_2d(height: int, width: int, kernel: int, dilation: int = 1) -> Mask:
    """Neighborhood attention on a row-major ``height x width`` grid (NATTEN-style, clamped at borders)."""
    height, width, kernel, dilation = sizes("neighborhood_2d", 1, height=height, width=width, kernel=kernel,
                                            dilation=dilation)

    def mask(b, h, q_idx, kv_idx):
        rows = _window_1d(q_idx // width, kv_idx // width, height, kernel, dilation)
        return rows & _window_1d(q_idx % width, kv_idx % width, width, kernel, dilation)
    return Mask(mask, f"neighborhood_2d({height}, {width}, {kernel}, {dilation})")


@_made_by_its_call
def neighborhood_3d(depth: int, height: int, width: int, kernel: int, dilation: int = 1) -> Mask:
    """Neighborhood attention on a ``depth x height x width`` volume (row-major), clamped at borders."""
    depth, height, width, kernel, dilation = sizes("neighborhood_3d", 1, depth=depth, height=height, width=width,
                                                   kernel=kernel, dilation=dilation)
    plane = height * width

    def mask(b, h, q_idx, kv_idx):
        depths = _window_1d(q_idx // plane, kv_idx // plane, depth, kernel, dilation)
        rows = _window_1d(q_idx % plane // width, kv_idx % plane // width, height, kernel, dilation)
        return depths & rows & _window_1d(q_idx % width, kv_idx % width, width, kernel, dilation)
    return Mask(mask, f"neighborhood_3d({depth}, {height}, {width}, {kernel}, {dilation})")


def _integers(name: str, label: str, tensor, dims: tuple[int, ...], shape: str) -> torch.Tensor:
    """``tensor``, refused unless it is an integer tensor with one of ``dims`` dimensions."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in dims or tensor.is_floating_point() \
            or tensor.is_complex() or tensor.dtype == torch.bool:
        got = f"a {tensor.dtype} tensor of shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) \
            else type(tensor).__name__
        raise ValueError(f"{name}: {label} must be an integer tensor {shape}, got {got}")
    return tensor
