"""The ``torch.autograd.Function`` around a spec's generated kernels."""

from __future__ import annotations

import torch


class AttentionFunction(torch.autograd.Function):
    """Forward returns ``(out, lse)``; backward fills q, k, v, normalization-parameter
    and captured-tensor gradients. ``lse`` is None for elementwise normalizations."""

    @staticmethod
    def forward(ctx, q, k, v, kernels, scale, config, num_params, *tensors):
        params, captures = tensors[:num_params], tensors[num_params:]
        out, lse, residuals = kernels.forward(q, k, v, captures, params, scale, config)
        ctx.save_for_backward(q, k, v, out, lse, *residuals, *params, *captures)
        ctx.kernels, ctx.scale, ctx.config = kernels, scale, config
        ctx.counts = (len(residuals), num_params)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        num_residuals, num_params = ctx.counts
        residuals, rest = rest[:num_residuals], rest[num_residuals:]
        params, captures = rest[:num_params], rest[num_params:]
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:
            dlse = dlse.float().contiguous()
        dq, dk, dv, dcaptures, dparams = ctx.kernels.backward(
            q, k, v, out, lse, residuals, dout, dlse, captures, params, ctx.scale, ctx.config)
        grads = [None] * len(captures)
        for index, grad in zip(ctx.kernels.DIFFERENTIABLE_CAPTURES, dcaptures):
            grads[index] = grad.to(captures[index].dtype)
        return (dq, dk, dv, None, None, None, None, *dparams, *grads)
