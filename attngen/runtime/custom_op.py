"""A compiled spec as ``torch.library`` custom ops, so ``torch.compile`` sees no graph break.

Each spec gets a forward op and a backward op (named after its cache key),
with fake implementations that only allocate outputs, and the backward op
registered as the forward op's autograd formula.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .loader import load_kernels

_ops: dict[str, Callable] = {}


def attention_op(path: Path, key: str) -> Callable:
    """``op(q, k, v, captures, params) -> [out, *stats, *residuals]`` for the module at ``path``."""
    name = f"attngen::attention_{key[:24]}"
    if name not in _ops:
        _ops[name] = _register(name, path)
    return _ops[name]


def _register(name: str, path: Path) -> Callable:
    def run_forward(q, k, v, captures, params, launch):
        kernels = load_kernels(path, interpret=q.device.type == "cpu")
        out, stats, residuals = kernels.run_forward(
            q, k, v, captures, params, kernels.scale_for(q), kernels.launch_config(q), launch=launch)
        return [out, *stats, *residuals]

    def run_backward(q, k, v, outputs, grads, captures, params, launch):
        kernels = load_kernels(path, interpret=q.device.type == "cpu")
        num_stats = len(kernels.STAT_OUTPUTS)
        out, stats, residuals = outputs[0], outputs[1:1 + num_stats], outputs[1 + num_stats:]
        dq, dk, dv, dcaptures, dparams = kernels.run_backward(
            q, k, v, out, stats, residuals, grads[0], grads[1:1 + num_stats], captures, params,
            kernels.scale_for(q), kernels.launch_config(q), launch=launch)
        return [dq, dk, dv, *dcaptures, *dparams]

    @torch.library.custom_op(name, mutates_args=())
    def forward(q: Tensor, k: Tensor, v: Tensor, captures: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        return run_forward(q, k, v, captures, params, launch=True)

    @forward.register_fake
    def _(q, k, v, captures, params):
        return run_forward(q, k, v, captures, params, launch=False)

    @torch.library.custom_op(f"{name}_backward", mutates_args=())
    def backward(q: Tensor, k: Tensor, v: Tensor, outputs: list[Tensor], grads: list[Tensor],
                 captures: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        return run_backward(q, k, v, outputs, grads, captures, params, launch=True)

    @backward.register_fake
    def _(q, k, v, outputs, grads, captures, params):
        return run_backward(q, k, v, outputs, grads, captures, params, launch=False)

    def setup_context(ctx, inputs, output):
        q, k, v, captures, params = inputs
        ctx.save_for_backward(q, k, v, *output, *captures, *params)
        ctx.sizes = (len(output), len(captures))

    def backward_formula(ctx, grads):
        q, k, v, *rest = ctx.saved_tensors
        num_outputs, num_captures = ctx.sizes
        outputs, captures, params = rest[:num_outputs], rest[num_outputs:num_outputs + num_captures], \
            rest[num_outputs + num_captures:]
        grads = [torch.zeros_like(o) if g is None else g.contiguous() for o, g in zip(outputs, grads)]
        dq, dk, dv, *rest = backward(q, k, v, list(outputs), grads, list(captures), list(params))
        kernels = load_kernels(path, interpret=q.device.type == "cpu")
        differentiable = kernels.DIFFERENTIABLE_CAPTURES
        dcaptures = [None] * num_captures
        for index, grad in zip(differentiable, rest[:len(differentiable)]):
            dcaptures[index] = grad.to(captures[index].dtype)
        return dq, dk, dv, dcaptures, list(rest[len(differentiable):])

    forward.register_autograd(backward_formula, setup_context=setup_context)
    return forward
