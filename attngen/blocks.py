"""User-given block sparsity: ``attn(q, k, v, block_mask=...)``.

A block mask says which (q-block, kv-block) pairs may attend at all, in blocks
of its own size; inside a kept block the spec's ``mask_mod`` still applies.
The kernels map it onto their own tiles through per-tile summaries, so the
two block sizes need not match.
"""

from __future__ import annotations

import math
import weakref

import torch

from .scalars import integer


class BlockMask:
    """Which blocks of ``block_size = (block_q, block_k)`` tokens attend.

    ``blocks`` is either a bool tensor ``[B or 1, H or 1, nq, nk]`` (True:
    the block is visited) or integer per-row block indices ``[B or 1, H or 1,
    nq, k]`` (top-k routing, block-sparse gating; negative entries are
    padding). ``H`` counts query heads.
    """

    def __init__(self, blocks: torch.Tensor, block_size: tuple[int, int] | int):
        if not isinstance(blocks, torch.Tensor) or blocks.dim() != 4:
            raise ValueError("block_mask must be a 4-d tensor [batch or 1, heads or 1, q blocks, kv blocks "
                             f"(or indices)], got {describe_value(blocks)}")
        if blocks.is_floating_point() or blocks.is_complex():
            raise TypeError(f"block_mask must be a bool tensor or integer block indices, got {blocks.dtype}")
        self.blocks = blocks
        self.block_size = block_size_pair(block_size)

    @classmethod
    def from_dense(cls, blocks: torch.Tensor, q_len: int, kv_len: int) -> BlockMask:
        """A bool ``[B|1, H|1, nq, nk]`` block matrix whose blocks are ``Lq/nq x Lk/nk`` tokens."""
        return cls(blocks, dense_block_size(blocks, q_len, kv_len))

    def dense(self, batch: int, heads: int, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
        """The bool block matrix, checked against a call's sizes and q's ``device`` and expanded to
        ``[batch, heads, nq, nk]`` (a view: batch or head dimensions of size 1 are not copied)."""
        return block_matrix(self.blocks, self.block_size, batch, heads, q_len, kv_len, device)

    def __repr__(self) -> str:
        kind = "bool" if self.blocks.dtype == torch.bool else "indices"
        return f"BlockMask({kind} {tuple(self.blocks.shape)}, block_size={self.block_size})"


def block_size_pair(block_size) -> tuple[int, int]:
    """``block_size``, a positive int or a pair ``(block_q, block_k)`` of them, as a pair."""
    sizes = (block_size, block_size) if integer(block_size) is not None \
        else tuple(block_size) if isinstance(block_size, (tuple, list)) else ()
    if len(sizes) != 2 or not all(integer(s) is not None and s >= 1 for s in sizes):
        raise ValueError(f"block_size must be a positive int or a pair (block_q, block_k), got {block_size!r}")
    return tuple(integer(s) for s in sizes)


def dense_block_size(blocks, q_len, kv_len):
    """The block size of a bool block matrix ``blocks`` [B|1, H|1, nq, nk] over ``q_len`` x ``kv_len`` tokens,
    ``(q_len / nq, kv_len / nk)`` (1 for no tokens); lengths that are not multiples of the counts are refused."""
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 4 or blocks.dtype != torch.bool:
        raise ValueError("block_mask must be an attngen.BlockMask, a FlexAttention BlockMask or a bool tensor "
                         f"[batch or 1, heads or 1, q blocks, kv blocks], got {describe_value(blocks)}")
    nq, nk = blocks.shape[2:]
    if nq == 0 or nk == 0:
        raise ValueError(f"block_mask has shape {tuple(blocks.shape)}: it needs at least one block per axis")
    for tokens, count, name in ((q_len, nq, "queries"), (kv_len, nk, "keys")):
        if tokens % count:  # blocks of several sizes make this count (128-token blocks over 1000 keys: 8)
            raise ValueError(f"block_mask is a bool block matrix of {nq} x {nk} blocks, which does not say their "
                             f"size: {tokens} {name} do not split evenly into {count} blocks; pass it with its "
                             "size, attngen.BlockMask(block_mask, block_size=(block_q, block_k))")
    return max(1, q_len // nq), max(1, kv_len // nk)


def block_matrix(blocks, block_size, batch, heads, q_len, kv_len, device):
    """``blocks`` (a bool block matrix, or integer per-row block indices whose negative entries are padding;
    ``[B|1, H|1, nq, nk or k]``, of ``block_size`` tokens) as the kernels read it: a bool
    ``[batch, heads, nq, nk]`` view (batch or head dimensions of size 1 are not copied), checked against a
    call's sizes and q's ``device``."""
    if blocks.device != device:
        raise ValueError(f"block_mask is on {blocks.device} but q is on {device}; move it to {device}")
    block_q, block_k = block_size
    need_q, need_k = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    for dim, (name, size) in enumerate((("batch", batch), ("heads", heads))):
        if blocks.shape[dim] not in (1, size):
            raise ValueError(f"block_mask has {blocks.shape[dim]} {name}; expected 1 or {size} "
                             f"(q has shape [{batch}, {heads}, {q_len}, ...])")
    if blocks.shape[2] < need_q:
        raise ValueError(f"block_mask has {blocks.shape[2]} q blocks of {block_q} tokens; "
                         f"{q_len} queries need {need_q}")
    if blocks.dtype == torch.bool:
        if blocks.shape[3] < need_k:
            raise ValueError(f"block_mask has {blocks.shape[3]} kv blocks of {block_k} tokens; "
                             f"{kv_len} keys need {need_k}")
    else:
        kv_blocks = max(need_k, 1)
        indices = blocks.long()
        valid = indices >= 0
        if bool((indices[valid] >= kv_blocks).any()):
            raise ValueError(f"block_mask indices must be below the number of kv blocks ({kv_blocks}), "
                             f"got {int(indices.max())}")
        blocks = scatter_blocks(torch.where(valid, indices, kv_blocks), kv_blocks)
    return blocks.expand(batch, heads, *blocks.shape[2:])


def flex_block_mask(block_mask):
    """``block_mask`` if it is a FlexAttention ``BlockMask``, else None."""
    try:
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    except ImportError:  # a torch without FlexAttention
        return None
    return block_mask if isinstance(block_mask, FlexBlockMask) else None


def flex_mask_mod(block_mask):
    """The mask_mod a FlexAttention ``BlockMask`` applies inside its blocks (None: its no-op mask)."""
    from torch.nn.attention.flex_attention import noop_mask
    return None if block_mask.mask_mod is noop_mask else block_mask.mask_mod


def as_block_mask(block_mask, q_len: int, kv_len: int, mask_mod=None) -> BlockMask:
    """``block_mask`` as given to a call: a :class:`BlockMask`, a bool block matrix, or a FlexAttention
    ``BlockMask``, whose mask_mod must then be the spec's ``mask_mod`` (or its no-op mask): attngen
    applies the spec's mask_mod in every kept block, FlexAttention the block mask's in partial ones."""
    if isinstance(block_mask, BlockMask):
        return block_mask
    flex = flex_block_mask(block_mask)
    if flex is None:
        return BlockMask.from_dense(block_mask, q_len, kv_len)
    own = flex_mask_mod(flex)
    if own is not None and own is not mask_mod:
        raise ValueError(f"block_mask is a FlexAttention BlockMask that applies its own mask_mod ({_name(own)}), "
                         f"not the spec's ({_name(mask_mod)}): compile AttentionSpec(mask_mod=block_mask.mask_mod), "
                         "or call ag.attention(q, k, v, score_mod, block_mask=block_mask), which takes it")
    return _from_flex(flex)


_FROM_FLEX = weakref.WeakKeyDictionary()  # FlexAttention BlockMask -> (its tensors, their versions, BlockMask)


def _from_flex(flex) -> BlockMask:
    """A FlexAttention ``BlockMask`` as a :class:`BlockMask`: one scatter of its partial and full blocks'
    per-row lists (``to_dense`` runs vmap, milliseconds of host time per call). A mask is made once and
    passed to many calls (every layer of a model), so the result is kept with the mask while it holds
    the same tensors, unchanged: their version counters, which in-place torch operations advance, are
    compared."""
    tensors = tuple(t for t in (flex.kv_num_blocks, flex.kv_indices, flex.full_kv_num_blocks, flex.full_kv_indices)
                    if t is not None)
    try:  # nothing is kept for inference tensors (no version counter) nor inside torch.compile's trace
        versions = None if torch.compiler.is_compiling() else tuple(t._version for t in tensors)
    except RuntimeError:
        versions = None
    kept = _FROM_FLEX.get(flex)
    if versions is not None and kept is not None and kept[1] == versions \
            and all(a is b for a, b in zip(kept[0], tensors, strict=True)):
        return kept[2]
    converted = BlockMask(flex_blocks(flex), tuple(flex.BLOCK_SIZE))
    if versions is not None:
        _FROM_FLEX[flex] = (tensors, versions, converted)
    return converted


def flex_blocks(flex):
    """A FlexAttention ``BlockMask``'s partial and full blocks as one bool block matrix ``[B|1, H|1, nq, nk]``:
    one scatter of their per-row lists."""
    lists = [(flex.kv_num_blocks, flex.kv_indices)]
    if flex.full_kv_num_blocks is not None:
        lists.append((flex.full_kv_num_blocks, flex.full_kv_indices))
    kv_blocks = flex.kv_indices.shape[-1]
    columns = torch.cat([torch.where(torch.arange(kv_blocks, device=indices.device) < counts[..., None],
                                     indices, kv_blocks) for counts, indices in lists], dim=-1)
    return scatter_blocks(columns, kv_blocks)


def scatter_blocks(columns, kv_blocks):
    """The bool block matrix ``[..., nq, kv_blocks]`` with True at each row's ``columns``; a column of
    ``kv_blocks`` (padding) sets nothing."""
    dense = torch.zeros(*columns.shape[:-1], kv_blocks + 1, dtype=torch.bool, device=columns.device)
    dense.scatter_(-1, columns.long(), True)  # padding lands in the extra column, dropped below
    return dense[..., :kv_blocks]


def blocks_mask_mod(blocks: torch.Tensor, block_size: tuple[int, int]):
    """The mask_mod that reads a ``[B, H, nq, nk]`` block matrix: it is captured like any tensor
    (the call passes the real one in its place)."""
    block_q, block_k = block_size

    def in_kept_block(b, h, q_idx, kv_idx):
        return blocks[b, h, q_idx // block_q, kv_idx // block_k]
    return in_kept_block


def _name(fn) -> str:
    return "None" if fn is None else getattr(fn, "__name__", repr(fn))


def describe_value(value) -> str:
    """``value`` in an error: a tensor's dtype and shape, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
