"""Launch configuration (tile sizes, warps, stages) for a call."""

from __future__ import annotations

import torch

from ..inputs import Shape


def _dot_precision(q: torch.Tensor) -> str:
    """float32 dots follow torch's TF32 switch; half-precision dots use Triton's default."""
    if q.dtype != torch.float32:
        return "tf32"  # only consulted for float32 operands
    return "tf32" if q.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def launch_config(q: torch.Tensor, shape: Shape) -> dict:
    """A fixed configuration; autotuning replaces it on GPUs later."""
    precision = _dot_precision(q)
    if not q.is_cuda:  # Triton's interpreter: few, small programs
        return {"BLOCK_M": 32, "BLOCK_N": 32, "PRECISION": precision, "UPCAST": q.dtype == torch.bfloat16}
    wide = max(shape.qk_dim, shape.v_dim) > 64 or q.dtype == torch.float32
    return {"BLOCK_M": 64, "BLOCK_N": 32 if wide else 64, "PRECISION": precision, "UPCAST": False,
            "num_warps": 4, "num_stages": 2}
