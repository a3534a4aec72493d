"""The keyword arguments of a call: block masks, KV caches, packed sequences.

:func:`prepare` checks them and turns a call into what the kernels take: the
:class:`~attngen.runtime.variants.Variant` to run, the tensors that replace its
stand-ins, and dense ``[B, H, L, D]`` views of q, k and v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks import as_block_mask
from ..inputs import KERNEL_DTYPES, Shape, check_inputs
from ..stats import Stats, map_stats
from .variants import Variant, packed_tensors


@dataclass
class Call:
    """One call, ready for the kernels."""

    variant: Variant
    tensors: dict[str, torch.Tensor]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    shape: Shape

    def finish(self, out: torch.Tensor, stats: Stats | None):
        """Outputs in the call's own layout: packed calls get ``(tokens, heads, dim)`` and ``[heads, tokens]``."""
        if not self.variant.packed:
            return out if stats is None else (out, stats)
        out = out[0].transpose(0, 1)
        if stats is None:
            return out
        return out, Stats(**{name: getattr(stats, name)[0] for name in stats.names()})


def _integers(name: str, value, length: int, device) -> torch.Tensor:
    """``value`` (an int or a 1-d integer tensor of ``length``) as an int32 tensor on ``device``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.full((length,), value, dtype=torch.int32, device=device)
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.is_floating_point() \
            or value.dtype == torch.bool or value.shape[0] != length:
        shown = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise ValueError(f"{name} must be an int or a 1-d integer tensor with one entry per batch entry "
                         f"({length}), got {shown}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but q is on {device}; move it to {device}")
    return value.to(torch.int32)


def _packed(q, k, v, cu_seqlens_q, cu_seqlens_k):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"with cu_seqlens, {name} must have 3 dimensions [tokens, heads, head_dim], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if isinstance(cu, torch.Tensor) and cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; move it to {q.device}")
    tensors = packed_tensors(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    return tensors, *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))


def prepare(spec, q, k, v, *, block_mask=None, kv_lens=None, q_offset=None, cu_seqlens_q=None,
            cu_seqlens_k=None) -> Call:
    """Check a call's arguments and build its :class:`Call`."""
    tensors: dict[str, torch.Tensor] = {}
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("packed sequences need both cu_seqlens_q and cu_seqlens_k")
        if block_mask is not None or kv_lens is not None or q_offset is not None:
            raise ValueError("cu_seqlens cannot be combined with block_mask, kv_lens or q_offset")
        if any(s.block_q is not None for s in map_stats(spec.stats)):
            raise ValueError("pooled maps are not defined for packed sequences (their blocks would straddle "
                             "sequences); col_sum is")
        tensors, q, k, v = _packed(q, k, v, cu_seqlens_q, cu_seqlens_k)
    shape = check_inputs(q, k, v, KERNEL_DTYPES)
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q is on {q.device}; attngen runs on CUDA GPUs and (interpreted) on CPU")
    cache = kv_lens is not None or q_offset is not None
    if cache:
        if map_stats(spec.stats):
            raise ValueError("maps (col_sum, pooled) are not supported with kv_lens / q_offset")
        lens = shape.kv_len if kv_lens is None else kv_lens
        tensors["kv_lens"] = _integers("kv_lens", lens, shape.batch, q.device)
        if bool((tensors["kv_lens"] < 0).any()) or bool((tensors["kv_lens"] > shape.kv_len).any()):
            raise ValueError(f"kv_lens must be between 0 and the cache length ({shape.kv_len}), "
                             f"got {tensors['kv_lens'].tolist()}")
        offset = tensors["kv_lens"] - shape.q_len if q_offset is None else q_offset
        tensors["q_offset"] = _integers("q_offset", offset, shape.batch, q.device)
    block_size = None
    if block_mask is not None:
        blocks = as_block_mask(block_mask, shape.q_len, shape.kv_len)
        block_size = blocks.block_size
        tensors["blocks"] = blocks.dense(shape.batch, shape.q_heads, shape.q_len, shape.kv_len)
    return Call(Variant(block_size, cache, packed), tensors, q, k, v, shape)
