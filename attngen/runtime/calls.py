"""The keyword arguments of a call: block masks, KV caches, packed sequences.

:func:`prepare` checks them and turns a call into what the kernels take: the
:class:`~attngen.runtime.variants.Variant` to run, the tensors that replace its
stand-ins, and dense ``[B, H, L, D]`` views of q, k and v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks import as_block_mask
from ..inputs import Shape, check_inputs
from ..qkv import (KERNEL_DTYPES, cache_positions, check_device, check_launch, check_pages_in_range, dropout_rate,
                   dropout_tensors, jagged_view, packed_output, packed_view, paged_view)
from ..stats import Stats, map_stats
from .variants import Variant


@dataclass
class Call:
    """One call, ready for the kernels."""

    variant: Variant
    tensors: dict[str, torch.Tensor]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    shape: Shape
    nested_offsets: torch.Tensor | None = None  # q's, where q, k and v came as jagged nested tensors

    def finish(self, out: torch.Tensor, stats: Stats | None):
        """Outputs in the call's own layout: packed calls get ``(tokens, heads, dim)`` and ``[heads, tokens]``,
        nested ones a jagged nested ``[batch, heads, j, dim]`` (and the packed statistics)."""
        if not self.variant.packed:
            return out if stats is None else (out, stats)
        out = packed_output(out, self.nested_offsets)
        if stats is None:
            return out
        return out, Stats(**{name: getattr(stats, name)[0] for name in stats.names()})


MODES = (None, "auto", "decode", "prefill")


def decoding(shape: Shape, q: torch.Tensor) -> bool:
    """Whether an automatic call splits its keys over programs: few queries, many keys, on a GPU."""
    return q.is_cuda and shape.q_len <= 16 and shape.kv_len >= 1024


def _dropout(spec, dropout_p, seed, device) -> dict[str, torch.Tensor]:
    """The stand-ins of a call with dropout (none without): its probability and seed as tensors."""
    rate = dropout_rate(spec.dropout_p if dropout_p is None else dropout_p)
    return dropout_tensors(rate, seed, device) if rate else {}


def check_packable(spec) -> None:
    """Refuse packed sequences for a spec with pooled maps: their blocks would straddle sequences."""
    if any(s.block_q is not None for s in map_stats(spec.stats)):
        raise ValueError("pooled maps are not defined for packed sequences (their blocks would straddle "
                         "sequences); col_sum is")


def prepare(spec, q, k, v, *, block_mask=None, kv_lens=None, q_offset=None, block_table=None, cu_seqlens_q=None,
            cu_seqlens_k=None, mode=None, dropout_p=None, seed=None) -> Call:
    """Check a call's arguments and build its :class:`Call`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    tensors: dict[str, torch.Tensor] = {}
    nested = any(isinstance(t, torch.Tensor) and t.is_nested for t in (q, k, v))
    if nested:
        cu_seqlens_q, cu_seqlens_k, q, k, v = jagged_view(q, k, v, cu_seqlens_q, cu_seqlens_k)
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("packed sequences need both cu_seqlens_q and cu_seqlens_k")
        if block_mask is not None or kv_lens is not None or q_offset is not None or block_table is not None:
            raise ValueError("cu_seqlens cannot be combined with block_mask, kv_lens, q_offset or block_table")
        check_packable(spec)
        tensors, q, k, v = packed_view(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if block_table is not None:
        k_cache, v_cache, tensors["block_table"] = paged_view(q, k, v, block_table, kv_lens)
        shape = check_inputs(q, k_cache, v_cache, KERNEL_DTYPES)
    else:
        shape = check_inputs(q, k, v, KERNEL_DTYPES)
    check_launch(shape.batch, shape.q_heads, shape.qk_dim, spec.differential is not None)
    check_device(q.device)
    cache = kv_lens is not None or q_offset is not None
    if cache:
        tensors["kv_lens"], tensors["q_offset"] = cache_positions(kv_lens, q_offset, shape.batch, shape.q_len,
                                                                  shape.kv_len, q.device)
        if block_table is not None:
            check_pages_in_range(tensors["block_table"], tensors["kv_lens"], k.shape[2], k.shape[0])
    block_size = None
    if block_mask is not None:
        blocks = as_block_mask(block_mask, shape.q_len, shape.kv_len, spec.mask_mod)
        block_size = blocks.block_size
        tensors["blocks"] = blocks.dense(shape.batch, shape.q_heads, shape.q_len, shape.kv_len, q.device)
    # sparsemax and entmax run split-KV calls unsplit (see CompiledAttention.for_call)
    split_kv = mode == "decode" or (mode in (None, "auto") and decoding(shape, q))
    tensors.update(_dropout(spec, dropout_p, seed, q.device))
    if spec.top_k is not None:  # a placeholder on q's device, never read: the generated forward computes the cut-offs
        tensors["topk_floor"] = torch.empty(1, 1, 1, device=q.device)
    variant = Variant(block_size, cache, packed, split_kv, block_table is not None, "dropout_seed" in tensors)
    return Call(variant, tensors, q, k, v, shape, cu_seqlens_q if nested else None)
