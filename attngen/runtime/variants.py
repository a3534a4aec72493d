"""Call variants: a spec rewritten for a kind of call, compiled once and cached like any spec.

A user block mask, a KV cache with per-batch lengths and query offsets, and
packed variable-length sequences are all expressed as ordinary mods over
captured *stand-in* tensors; a call passes its real tensors in their places.
So the mask plan, the backward pass, statistics and normalizations work for
them unchanged, and masks keep skipping tiles: ``kv_idx < kv_lens[b]`` bounds
the kv loop in closed form, and the sequence ids of packed tokens are
summarized per tile, so no tile mixing two sequences is computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..blocks import blocks_mask_mod
from ..spec import AttentionSpec
from ..stats import expectations_moved

_INT = dict(dtype=torch.int32)
# read by the kernels themselves, not by mods (topk_floor: top-k attention's cut-offs, see AttentionSpec.top_k)
KERNEL_CAPTURES = ("block_table", "dropout_seed", "dropout_p", "topk_floor")


@dataclass(frozen=True)
class Variant:
    """Which call features a compiled module supports.

    ``block_size``: a call-time block mask of that block size (None: no block mask).
    ``cache``: k and v are caches; key ``kv_idx`` exists when ``kv_idx < kv_lens[b]``, and the
    mods see query ``q_idx + q_offset[b]``.
    ``packed``: q, k, v hold sequences packed along one axis (``cu_seqlens``); the mods see the
    sequence as ``b`` and positions within it.
    ``split_kv`` (a kernel feature, not a rewrite): the forward pass splits each row's keys over
    several programs and merges their partial results (split-KV, "flash decoding").
    ``paged`` (a kernel feature, with ``cache``): k and v are pages ``[pages, Hkv, page_size, D]``
    and key ``kv_idx`` of batch entry ``b`` is row ``kv_idx % page_size`` of page
    ``block_table[b, kv_idx // page_size]``; the block table is passed like a captured tensor.
    ``dropout`` (a kernel feature): normalized weights are dropped with the probability and seed
    the call passes, also like captured tensors, so the backward pass regenerates the same mask.
    """

    block_size: tuple[int, int] | None = None
    cache: bool = False
    packed: bool = False
    split_kv: bool = False
    paged: bool = False
    dropout: bool = False

    def encode(self) -> str:
        """This variant as a short string, e.g. ``"64x128/01000"``; :meth:`decode` reverses it."""
        blocks = "-" if self.block_size is None else f"{self.block_size[0]}x{self.block_size[1]}"
        flags = (self.cache, self.packed, self.split_kv, self.paged, self.dropout)
        return blocks + "/" + "".join("1" if flag else "0" for flag in flags)

    @staticmethod
    def decode(text: str) -> Variant:
        blocks, flags = text.split("/")
        block_size = None if blocks == "-" else tuple(int(n) for n in blocks.split("x"))
        return Variant(block_size, *(flag == "1" for flag in flags))

    def stand_ins(self) -> dict[str, torch.Tensor]:
        """One small placeholder tensor per call tensor the rewritten mods read, by name."""
        found = {}
        if self.block_size is not None:
            found["blocks"] = torch.zeros(1, 1, 1, 1, dtype=torch.bool)
        if self.cache:
            found.update(q_offset=torch.zeros(1, **_INT), kv_lens=torch.zeros(1, **_INT))
        if self.packed:
            found.update({name: torch.zeros(1, **_INT) for name in ("seq_q", "seq_k", "start_q", "start_k",
                                                                      "len_k")})
        if self.paged:
            found["block_table"] = torch.zeros(1, 1, **_INT)
        if self.dropout:
            found.update(dropout_seed=torch.zeros(1, dtype=torch.int64), dropout_p=torch.zeros(1))
        return found

    def rewrite(self, spec: AttentionSpec, t: dict[str, torch.Tensor]):
        """``(spec, key_count)``: ``spec`` with mods over the stand-ins ``t``, and the row's number of
        keys as a function of ``(b, q_idx)`` for length-normalized normalizations (None: LK)."""
        score, second, mask, key_count = spec.score_mod, spec.second_score_mod, spec.mask_mod, None
        stats = spec.stats
        if self.cache:
            second = _shift_queries(second, None, t["q_offset"])[0]
            score, mask = _shift_queries(score, mask, t["q_offset"])
            stats = expectations_moved(stats, lambda g: _shift_queries(g, None, t["q_offset"])[0])
            mask = _and(lambda b, h, q_idx, kv_idx: kv_idx < t["kv_lens"][b], mask)
            key_count = lambda b, q_idx: t["kv_lens"][b]  # noqa: E731
        if self.block_size is not None:  # blocks of the call's own tiles: unshifted query positions
            mask = _and(mask, blocks_mask_mod(t["blocks"], self.block_size))
        if self.packed:
            second = _unpack(second, None, t)[0]
            score, mask = _unpack(score, mask, t)
            stats = expectations_moved(stats, lambda g: _unpack(g, None, t)[0])
            key_count = lambda b, q_idx: t["len_k"][t["seq_q"][q_idx]]  # noqa: E731
        traced = dataclasses.replace(spec, score_mod=score, second_score_mod=second, mask_mod=mask, stats=stats)
        return traced, key_count

    def describe(self) -> str:
        parts = [f"block mask of {self.block_size[0]} x {self.block_size[1]} blocks"] if self.block_size else []
        parts += ["KV cache (kv_lens, q_offset)"] if self.cache else []
        parts += ["packed sequences (cu_seqlens)"] if self.packed else []
        parts += ["split-KV forward (decoding)"] if self.split_kv else []
        parts += ["paged KV cache (block_table)"] if self.paged else []
        parts += ["dropout"] if self.dropout else []
        return ", ".join(parts) or "plain"


# kinds of call by name, as ``attngen show --call`` and ``export(path, call=...)`` take them (a call picks
# its own, see attngen.runtime.calls)
CALLS = {
    "plain": Variant(),
    "cache": Variant(cache=True),
    "decode": Variant(cache=True, split_kv=True),
    "paged": Variant(cache=True, split_kv=True, paged=True),
    "packed": Variant(packed=True),
    "dropout": Variant(dropout=True),
}


def _and(first, second):
    if first is None or second is None:
        return second if first is None else first
    return lambda b, h, q_idx, kv_idx: first(b, h, q_idx, kv_idx) & second(b, h, q_idx, kv_idx)


def _shift_queries(score, mask, q_offset):
    """The mods seeing absolute query positions ``q_idx + q_offset[b]``."""
    new_score = None if score is None else \
        (lambda s, b, h, q_idx, kv_idx: score(s, b, h, q_idx + q_offset[b], kv_idx))
    new_mask = None if mask is None else (lambda b, h, q_idx, kv_idx: mask(b, h, q_idx + q_offset[b], kv_idx))
    return new_score, new_mask


def _unpack(score, mask, t):
    """The mods of one packed batch: sequence ``b = seq_q[q_idx]``, positions within it, and only
    keys of the same sequence kept."""
    def local(b, q_idx, kv_idx):
        sequence = t["seq_q"][q_idx]
        return sequence, q_idx - t["start_q"][sequence], kv_idx - t["start_k"][t["seq_k"][kv_idx]]

    def same_sequence(b, h, q_idx, kv_idx):
        return t["seq_q"][q_idx] == t["seq_k"][kv_idx]

    new_score = None
    if score is not None:
        def new_score(s, b, h, q_idx, kv_idx):
            sequence, q_pos, kv_pos = local(b, q_idx, kv_idx)
            return score(s, sequence, h, q_pos, kv_pos)
    new_mask = same_sequence
    if mask is not None:
        def new_mask(b, h, q_idx, kv_idx):
            sequence, q_pos, kv_pos = local(b, q_idx, kv_idx)
            return same_sequence(b, h, q_idx, kv_idx) & mask(sequence, h, q_pos, kv_pos)
    return new_score, new_mask
