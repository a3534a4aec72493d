"""One test input: sizes, dtype and seed of an attention call."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from ..inputs import Shape
from ..spec import AttentionSpec


@dataclass(frozen=True)
class Case(Shape):
    """q ``[batch, q_heads, q_len, qk_dim]``, k ``[batch, kv_heads, kv_len, qk_dim]``,
    v ``[batch, kv_heads, kv_len, v_dim]`` of ``dtype``, drawn from ``seed``.

    ``grid``: q rounded to multiples of 1/4 and k to multiples of 3/16 in [-2, 2], whose products are exact in
    float32 (and in bfloat16 inputs): float32 kernels and a float64 reference then rank each row's scores
    alike, ties included, as top-k attention needs to keep the same keys on both sides (see
    :func:`for_spec`). The 3 keeps sparsemax's threshold (a row's sum of logits less 1, over their count) off
    the scores for power-of-two scales: where it falls on a logit exactly, its gradient jumps."""

    dtype: torch.dtype = torch.float32
    seed: int = 0
    grid: bool = False

    def tensors(self, requires_grad: bool = True, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v: standard normal (q and k on their grids with ``grid``), drawn on the CPU from ``seed``
        (the same on every machine)."""
        gen = torch.Generator().manual_seed(self.seed)
        shapes = ((self.batch, self.q_heads, self.q_len, self.qk_dim), (self.batch, self.kv_heads, self.kv_len,
                  self.qk_dim), (self.batch, self.kv_heads, self.kv_len, self.v_dim))
        drawn = [torch.randn(s, generator=gen) for s in shapes]
        if self.grid:
            drawn[0] = (4 * drawn[0]).round().clamp(-8, 8) / 4
            drawn[1] = (16 / 3 * drawn[1]).round().clamp(-10, 10) * (3 / 16)
        return tuple(t.to(device=device, dtype=self.dtype).requires_grad_(requires_grad) for t in drawn)

    @property
    def id(self) -> str:
        """A short name for test ids and reports."""
        dtype = str(self.dtype).replace("torch.", "")
        return (f"B{self.batch}-H{self.q_heads}:{self.kv_heads}-L{self.q_len}x{self.kv_len}"
                f"-D{self.qk_dim}x{self.v_dim}-{dtype}")

    def snippet(self) -> str:
        """Python that rebuilds this case: ``q, k, v = Case(...).tensors()``."""
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in
                           ("batch", "q_heads", "kv_heads", "q_len", "kv_len", "qk_dim", "v_dim", "dtype", "seed"))
        return f"q, k, v = attngen.testing.Case({fields}{', grid=True' if self.grid else ''}).tensors()"


def for_spec(case: Case, spec: AttentionSpec) -> Case:
    """``case`` as inputs for ``spec``: on the grid (:class:`Case`) where the spec keeps each row's top-k
    logits, whose choice of keys must not turn on rounding."""
    return dataclasses.replace(case, grid=True) if spec.top_k is not None else case


def packed_call(q, k, v, lens_q: list[int], lens_k: list[int], **call):
    """A case's ``q, k, v`` as packed sequences: batch entry b's first ``lens_q[b]`` queries and
    ``lens_k[b]`` keys, concatenated along the token axis. Returns ``((q, k, v), call)`` with q
    ``[tokens, Hq, Dqk]`` and ``call`` the keyword arguments ``cu_seqlens_q`` and ``cu_seqlens_k``
    (and those given, e.g. ``dropout_p``)."""
    def pack(t, lens):
        return torch.cat([t[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)])

    def offsets(lens):
        return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=q.device)
    return (pack(q, lens_q), pack(k, lens_k), pack(v, lens_k)), dict(cu_seqlens_q=offsets(lens_q),
                                                                     cu_seqlens_k=offsets(lens_k), **call)


def paged_call(q, k, v, kv_lens: list[int], page_size: int, seed: int, **call):
    """A case's k and v as a paged KV cache: each batch entry's rows cut into pages of ``page_size``
    and stored in one pool in an order drawn from ``seed``. Returns ``((q, k_pages, v_pages), call)``
    with ``call`` the keyword arguments ``kv_lens`` and ``block_table`` (and those given, e.g. ``mode``)."""
    batch, _, length, _ = k.shape
    per_entry = -(-length // page_size)
    order = torch.randperm(batch * per_entry, generator=torch.Generator().manual_seed(seed)).to(k.device)

    def pages(t):  # page i of the cache (entry i // per_entry) goes to slot order[i] of the pool
        padded = torch.nn.functional.pad(t, (0, 0, 0, per_entry * page_size - length))
        return padded.unflatten(2, (per_entry, page_size)).transpose(1, 2).flatten(0, 1)[torch.argsort(order)]
    table = order.view(batch, per_entry).to(torch.int32)
    return (q, pages(k), pages(v)), dict(kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=q.device),
                                         block_table=table, **call)
