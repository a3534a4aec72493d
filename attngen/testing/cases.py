"""One test input: sizes, dtype and seed of an attention call."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inputs import Shape


@dataclass(frozen=True)
class Case(Shape):
    """q ``[batch, q_heads, q_len, qk_dim]``, k ``[batch, kv_heads, kv_len, qk_dim]``,
    v ``[batch, kv_heads, kv_len, v_dim]`` of ``dtype``, drawn from ``seed``."""

    dtype: torch.dtype = torch.float32
    seed: int = 0

    def tensors(self, requires_grad: bool = True, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v: standard normal, drawn on the CPU from ``seed`` (the same on every machine)."""
        gen = torch.Generator().manual_seed(self.seed)
        shapes = ((self.batch, self.q_heads, self.q_len, self.qk_dim), (self.batch, self.kv_heads, self.kv_len,
                  self.qk_dim), (self.batch, self.kv_heads, self.kv_len, self.v_dim))
        return tuple(torch.randn(s, generator=gen).to(device=device, dtype=self.dtype).requires_grad_(requires_grad)
                     for s in shapes)

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
        return f"q, k, v = attngen.testing.Case({fields}).tensors()"
