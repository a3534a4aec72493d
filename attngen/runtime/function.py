"""The ``torch.autograd.Function`` around a spec's generated kernels."""

from __future__ import annotations

import torch


class AttentionFunction(torch.autograd.Function):
    """Forward returns ``(out, lse)``; backward fills q, k, v and captured-tensor grads."""

    @staticmethod
    def forward(ctx, q, k, v, kernels, scale, config, *captures):
        out, lse = kernels.forward(q, k, v, captures, scale, config)
        ctx.save_for_backward(q, k, v, out, lse, *captures)
        ctx.kernels, ctx.scale, ctx.config = kernels, scale, config
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *captures = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:
            dlse = dlse.float().contiguous()
        dq, dk, dv, dcaptures = ctx.kernels.backward(q, k, v, out, lse, dout, dlse, captures, ctx.scale, ctx.config)
        grads = [None] * len(captures)
        for index, grad in zip(ctx.kernels.DIFFERENTIABLE_CAPTURES, dcaptures):
            grads[index] = grad.to(captures[index].dtype)
        return (dq, dk, dv, None, None, None, *grads)
