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
