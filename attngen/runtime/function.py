"""The ``torch.autograd.Function`` around a spec's generated kernels."""

from __future__ import annotations

import torch


class AttentionFunction(torch.autograd.Function):
    """Forward returns ``(out, *stats)`` (the module's STAT_OUTPUTS); backward fills q, k, v,
    normalization-parameter and captured-tensor gradients."""

    @staticmethod
    def forward(ctx, q, k, v, kernels, scale, config, num_params, *tensors):
        params, captures = tensors[:num_params], tensors[num_params:]
        out, stats, residuals = kernels.forward(q, k, v, captures, params, scale, config)
        ctx.save_for_backward(q, k, v, out, *stats, *residuals, *params, *captures)
        ctx.kernels, ctx.scale, ctx.config = kernels, scale, config
        ctx.counts = (len(stats), len(residuals), num_params)
        ctx.set_materialize_grads(False)
        return (out, *stats)

    @staticmethod
    def backward(ctx, dout, *dstats):
        q, k, v, out, *rest = ctx.saved_tensors
        sizes = ctx.counts
        stats, residuals, params = (rest[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(3))
        captures = rest[sum(sizes):]
        if dout is None:
            dout = torch.zeros_like(out)
        dstats = [None if d is None else d.float().contiguous() for d in dstats]
        dq, dk, dv, dcaptures, dparams = ctx.kernels.backward(
            q, k, v, out, stats, residuals, dout, dstats, captures, params, ctx.scale, ctx.config)
        grads = [None] * len(captures)
        for index, grad in zip(ctx.kernels.DIFFERENTIABLE_CAPTURES, dcaptures):
            grads[index] = grad.to(captures[index].dtype)
        return (dq, dk, dv, None, None, None, None, *dparams, *grads)
