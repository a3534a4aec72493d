"""Validation of the tensors passed to an attention call."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .qkv import MAX_HEAD_DIM, autocast_qkv, check_qkv


@dataclass(frozen=True)
class Shape:
    """Sizes of one attention call."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    qk_dim: int
    v_dim: int


def _transformed(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform (the kernels would get no storage to read);
    not asked while torch.compile traces, which cannot trace the question."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t)


def under_autocast(call):
    """``call(self, q, k, v, ...)`` as torch's SDPA and FlexAttention behave under ``torch.autocast``
    (see :func:`autocast_qkv`)."""

    @functools.wraps(call)
    def cast(self, q, k, v, *args, **kwargs):
        q, k, v, autocast = autocast_qkv(q, k, v)
        if autocast is None:
            return call(self, q, k, v, *args, **kwargs)
        with torch.autocast(autocast, enabled=False):
            return call(self, q, k, v, *args, **kwargs)
    return cast


def check_inputs(q, k, v, dtypes=None, max_head_dim: int = MAX_HEAD_DIM) -> Shape:
    """Validate q [B,Hq,Lq,Dqk], k [B,Hkv,Lk,Dqk], v [B,Hkv,Lk,Dv]; return their sizes.

    ``dtypes`` restricts the floating dtypes accepted (the kernels' set) and refuses torch.func's
    wrapped tensors (the kernels' calls; the reference runs under torch.func); the kernels' calls
    also take head dims up to ``max_head_dim``.
    """
    if dtypes is not None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if isinstance(t, torch.Tensor) and _transformed(t):
                raise NotImplementedError(
                    f"{name} is a tensor of a torch.func transform (grad, vmap, jacrev, ...): attngen's kernels "
                    "support torch.autograd (loss.backward(), torch.autograd.grad) and batched calls, not torch.func")
    return Shape(*check_qkv(q, k, v, dtypes, max_head_dim if dtypes is not None else None))
