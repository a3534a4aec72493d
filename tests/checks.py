"""Running a test variant through the kernels and the float64 reference (attngen.testing)."""

from __future__ import annotations

import numpy
import torch
import triton
import triton.language as tl

import attngen as ag
from attngen.runtime.loader import load_kernels
from attngen.testing import Case, assert_matches_reference
from attngen.testing.dispatches import dispatched


def fills(run) -> dict[str, int]:
    """The torch operations that fill memory (zeros, fill_, full: each a kernel on a GPU) that ``run()``
    dispatches, with how many times each."""
    return {name: n for name, n in dispatched(run).items() if "zero" in name or "fill" in name or name == "full"}


def variant_inputs(variant, case: Case):
    """q, k, v of ``case`` and the variant's spec, its captured tensors drawn from the case's seed."""
    captures = variant.captures(case, torch.Generator().manual_seed(case.seed + 1))
    return (*case.tensors(), variant.spec(captures))


def check_variant(variant, case: Case, **options):
    """Forward, statistics and every gradient of ``variant`` on ``case`` against float64."""
    q, k, v, spec = variant_inputs(variant, case)
    return assert_matches_reference(spec, q, k, v, seed=case.seed, **options)


def apply_kernel_helper(spec, helper: str, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The ``@triton.jit`` function ``helper`` of ``spec``'s generated module applied to each element of
    the float32 vector ``x``, under Triton's interpreter."""
    return _elementwise(getattr(load_kernels(ag.compile(spec).path, interpret=True), helper), x, monkeypatch, False)


def apply_score_fn(spec, x: torch.Tensor, monkeypatch, derivative: bool = False) -> torch.Tensor:
    """``spec``'s score_fn (score_mod as the kernels compute it; ``derivative``: its derivative in the score,
    score_fn_backward, for a score_mod without captured tensors) applied to each element of the float32 vector
    ``x`` as the score, at b = h = q_idx = kv_idx = 0, under Triton's interpreter."""
    kernels = load_kernels(ag.compile(spec).path, interpret=True)
    return _elementwise(kernels.score_fn_backward if derivative else kernels.score_fn, x, monkeypatch, True)


def _elementwise(function, x: torch.Tensor, monkeypatch, as_score: bool) -> torch.Tensor:
    monkeypatch.setitem(globals(), "_helper", function)  # what the kernel below calls
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)

    @triton.jit
    def apply(X, OUT, N, BLOCK: tl.constexpr, AS_SCORE: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < N
        value = tl.load(X + offs, mask=inside)
        if AS_SCORE:  # score_fn(qk, b, h, q_idx, kv_idx, q_valid, kv_valid)
            value = _helper(value, offs * 0, offs * 0, offs * 0, offs * 0, inside, inside)  # noqa: F821 - set above
        else:
            value = _helper(value)  # noqa: F821 - set above
        tl.store(OUT + offs, value, mask=inside)

    out = torch.empty_like(x)
    with numpy.errstate(divide="ignore", invalid="ignore", over="ignore"):  # infinities and NaN, on purpose
        apply[(-(-x.numel() // 1024),)](x, out, x.numel(), BLOCK=1024, AS_SCORE=as_score)
    return out


def paged_cache(batch=3, kv_heads=2, page=8, pages=20, max_pages=7, dim=16, seed=0):
    """k and v pages ``[pages, kv_heads, page, dim]`` and a block table ``[batch, max_pages]`` of
    distinct random pages per batch entry."""
    gen = torch.Generator().manual_seed(seed)
    k_pages = torch.randn(pages, kv_heads, page, dim, generator=gen)
    v_pages = torch.randn(pages, kv_heads, page, dim, generator=gen)
    table = torch.stack([torch.randperm(pages, generator=gen)[:max_pages] for _ in range(batch)]).int()
    return k_pages, v_pages, table


def check_paged(spec, q, k_pages, v_pages, table, kv_lens, mode):
    """A paged-cache call equals the call on the gathered contiguous cache, and the reference."""
    paged = ag.compile(spec)(q, k_pages, v_pages, kv_lens=kv_lens, block_table=table, mode=mode)
    contiguous = ag.compile(spec)(q, ag.reference.gather_pages(k_pages, table),
                                  ag.reference.gather_pages(v_pages, table), kv_lens=kv_lens)
    torch.testing.assert_close(paged, contiguous, atol=1e-6, rtol=1e-6)
    assert_matches_reference(spec, q, k_pages, v_pages, kv_lens=kv_lens, block_table=table, mode=mode)


def check_wide_scores(dtype=torch.float32, device="cpu"):
    """Sigmoid weights of scores capped by ``30 tanh(s / 30)``, on raw scores from -51 to 51 (sigmoid
    and tanh saturating both ways, tanh also near 0), against float64."""
    spec = ag.AttentionSpec(normalization=ag.norms.Sigmoid(),
                            score_mod=lambda s, b, h, q_idx, kv_idx: 30 * torch.tanh(s / 30))
    q, k, v = Case(1, 2, 2, 40, 50, 16, 16, dtype=dtype, seed=3).tensors(device=device)
    q = (12 * q).detach().requires_grad_()
    scores = q.float() @ k.float().transpose(-1, -2) / 4
    assert scores.min() < -50 and scores.max() > 50 and (scores.abs() < 1).any()
    assert_matches_reference(spec, q, k, v)
