"""Running a variant through the kernels and the float64 reference, and comparing."""

from __future__ import annotations

import torch

import attngen as ag
from attngen.inputs import Shape as Case
from attngen.testing import assert_close


def inputs(case: Case, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
    q = randn(case.batch, case.q_heads, case.q_len, case.qk_dim)
    k = randn(case.batch, case.kv_heads, case.kv_len, case.qk_dim)
    v = randn(case.batch, case.kv_heads, case.kv_len, case.v_dim)
    return q, k, v, gen


def _as_float64(captures: dict) -> dict:
    copies = {}
    for name, value in captures.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().double().requires_grad_(value.requires_grad)
        copies[name] = value
    return copies


def _loss_and_grads(out, stats, upstream, leaves):
    """Gradients of sum(out * dout) + sum(stat * dstat) over the finite stats."""
    loss = (out.to(upstream["out"].dtype) * upstream["out"]).sum()
    for name in stats.names():
        value = getattr(stats, name).to(upstream[name].dtype)
        loss = loss + (torch.where(torch.isfinite(value), value, torch.zeros_like(value)) * upstream[name]).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def check_variant(variant, case: Case, dtype=torch.float32, seed=0, tol=2e-5):
    """Forward, statistics and every gradient of ``variant`` on ``case`` vs float64."""
    q, k, v, gen = inputs(case, dtype, seed)
    captures = variant.captures(case, gen)
    learnable = [name for name, t in captures.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    out, stats = ag.compile(variant.spec(captures))(q, k, v, return_stats=True)
    upstream = {"out": torch.randn(out.shape, generator=gen)}
    upstream.update({name: torch.randn(getattr(stats, name).shape, generator=gen) for name in stats.names()})
    grads = _loss_and_grads(out, stats, upstream, [q, k, v, *(captures[n] for n in learnable)])

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    captures64 = _as_float64(captures)
    ref_out, ref_stats = ag.reference.attention(q64, k64, v64, variant.spec(captures64), return_stats=True)
    ref_grads = _loss_and_grads(ref_out, ref_stats, {n: u.double() for n, u in upstream.items()},
                                [q64, k64, v64, *(captures64[n] for n in learnable)])

    assert_close("out", out, ref_out, atol=tol, rtol=tol)
    for name in stats.names():
        assert_close(name, getattr(stats, name), getattr(ref_stats, name), atol=tol, rtol=tol)
    for name, grad, ref in zip(["dq", "dk", "dv", *learnable], grads, ref_grads):
        assert grad is not None, f"no gradient for {name}"
        assert_close(name, grad, ref, atol=tol, rtol=tol)
    return out, stats
