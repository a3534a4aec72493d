"""Validation of the tensors passed to an attention call."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 1024  # attention; above 256 (MLA's 576 / 512) the kernels take small tiles
LINEAR_MAX_HEAD_DIM = 256  # linear attention keeps a [Dqk, Dv] state in each program


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


def values_checkable(t: torch.Tensor) -> bool:
    """Whether a call may read ``t``'s values to check them: not while torch.compile traces (they
    are data there, and a check would break the graph) nor while a CUDA graph is being captured
    (reading them would synchronize the device). The kernels stay within the tensors either way."""
    return not torch.compiler.is_compiling() and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _transformed(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform (the kernels would get no storage to read);
    not asked while torch.compile traces, which cannot trace the question."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t)


def under_autocast(call):
    """``call(self, q, k, v, ...)`` as torch's SDPA and FlexAttention behave under ``torch.autocast``:
    where autocast is on for q's device, q, k and v (float64 aside) are cast to its dtype and the call
    runs with autocast off, so the launchers' and linear attention's own float32 products stay float32."""

    @functools.wraps(call)
    def cast(self, q, k, v, *args, **kwargs):
        device = q.device.type if isinstance(q, torch.Tensor) else None
        if device is None or not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
            return call(self, q, k, v, *args, **kwargs)
        dtype = torch.get_autocast_dtype(device)
        q, k, v = (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                   else t for t in (q, k, v))
        with torch.autocast(device, enabled=False):
            return call(self, q, k, v, *args, **kwargs)
    return cast


def check_inputs(q, k, v, dtypes=None, max_head_dim: int = MAX_HEAD_DIM) -> Shape:
    """Validate q [B,Hq,Lq,Dqk], k [B,Hkv,Lk,Dqk], v [B,Hkv,Lk,Dv]; return their sizes.

    ``dtypes`` restricts the floating dtypes accepted (the kernels' set) and refuses torch.func's
    wrapped tensors (the kernels' calls; the reference runs under torch.func); the kernels' calls
    also take head dims up to ``max_head_dim``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if dtypes is not None and _transformed(t):
            raise NotImplementedError(
                f"{name} is a tensor of a torch.func transform (grad, vmap, jacrev, ...): attngen's kernels "
                "support torch.autograd (loss.backward(), torch.autograd.grad) and batched calls, not torch.func")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [batch, heads, seq_len, head_dim], "
                             f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if dtypes is not None and t.dtype not in dtypes:
            raise TypeError(f"{name} has dtype {t.dtype}; the kernels support "
                            f"{', '.join(str(d) for d in dtypes)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Lq, Dqk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    Hkv = k.shape[1]
    if Hkv == 0:
        raise ValueError(f"k and v must have at least one head, got shape {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the number of "
                         f"key/value heads ({Hkv}) (grouped-query attention)")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != Dqk:
        raise ValueError(f"q and k must have the same head dim, got {Dqk} and {k.shape[3]}")
    shape = Shape(B, Hq, Hkv, Lq, k.shape[2], Dqk, v.shape[3])
    if dtypes is not None:
        for name, d in (("q/k head dim", shape.qk_dim), ("v head dim", shape.v_dim)):
            if not 1 <= d <= max_head_dim:
                raise ValueError(f"{name} must be between 1 and {max_head_dim}, got {d}")
    return shape
