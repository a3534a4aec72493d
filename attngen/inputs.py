"""Validation of the tensors passed to an attention call."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .qkv import MAX_HEAD_DIM, check_qkv, under_autocast


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


def method_under_autocast(method):
    """``method(self, q, k, v, ...)`` run under ``torch.autocast`` as :func:`under_autocast` runs a function."""

    run = under_autocast(lambda q, k, v, self, *args, **kwargs: method(self, q, k, v, *args, **kwargs))

    @functools.wraps(method)
    def cast(self, q, k, v, *args, **kwargs):
        return run(q, k, v, self, *args, **kwargs)
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
