"""Running a test variant through the kernels and the float64 reference (attngen.testing)."""

from __future__ import annotations

import torch

from attngen.testing import Case, assert_matches_reference


def variant_inputs(variant, case: Case):
    """q, k, v of ``case`` and the variant's spec, its captured tensors drawn from the case's seed."""
    captures = variant.captures(case, torch.Generator().manual_seed(case.seed + 1))
    return (*case.tensors(), variant.spec(captures))


def check_variant(variant, case: Case, **options):
    """Forward, statistics and every gradient of ``variant`` on ``case`` against float64."""
    q, k, v, spec = variant_inputs(variant, case)
    return assert_matches_reference(spec, q, k, v, seed=case.seed, **options)


def paged_cache(batch=3, kv_heads=2, page=8, pages=20, max_pages=7, dim=16, seed=0):
    """k and v pages ``[pages, kv_heads, page, dim]`` and a block table ``[batch, max_pages]`` of
    distinct random pages per batch entry."""
    gen = torch.Generator().manual_seed(seed)
    k_pages = torch.randn(pages, kv_heads, page, dim, generator=gen)
    v_pages = torch.randn(pages, kv_heads, page, dim, generator=gen)
    table = torch.stack([torch.randperm(pages, generator=gen)[:max_pages] for _ in range(batch)]).int()
    return k_pages, v_pages, table
