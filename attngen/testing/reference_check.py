"""Compare a compiled spec with its materialized reference on given inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reference
from ..runtime.compiled import compile as compile_spec
from ..spec import AttentionSpec
from .compare import max_error


@dataclass(frozen=True)
class Comparison:
    """One compared quantity: its max error against the float64 reference and the bound."""

    name: str
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


def compare_with_reference(spec: AttentionSpec, q, k, v, *, tol: float = 1e-4) -> list[Comparison]:
    """Forward, every statistic and every gradient (q, k, v, learnable captures) vs float64.

    The bound of each quantity is ``tol * (1 + max|reference|)``. Captured
    tensors keep their dtype in the reference (their values are what is compared).
    """
    attn = compile_spec(spec)
    learnable = [c.tensor for c in attn.graph.captures if c.differentiable]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    results = []
    outputs = []
    for run, inputs in ((attn, leaves), (lambda *a, **kw: reference.attention(*a, spec, **kw), leaves64)):
        for t in learnable:
            t.grad = None
        out, stats = run(*inputs, return_stats=True)
        values = {"out": out, **{name: getattr(stats, name) for name in stats.names()}}
        loss = sum((torch.where(torch.isfinite(x), x, 0.0).double() * (i + 1)).sum() / x.numel() ** 0.5
                   for i, x in enumerate(values.values()))
        grads = torch.autograd.grad(loss, [*inputs, *learnable], allow_unused=True)
        names = ["dq", "dk", "dv", *(f"d capture{i}" for i, c in enumerate(attn.graph.captures) if c.differentiable)]
        outputs.append({**values, **dict(zip(names, grads))})
    for name, expected in outputs[1].items():
        actual = outputs[0][name]
        if expected is None or actual is None:
            results.append(Comparison(name, 0.0 if actual is expected else float("inf"), 0.0))
            continue
        finite = expected.detach()[torch.isfinite(expected)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        results.append(Comparison(name, max_error(actual, expected), tol * (1.0 + scale)))
    return results
