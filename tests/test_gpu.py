"""The compiled CUDA kernels against the float64 reference (skipped without a GPU)."""

import dataclasses

import pytest
import torch

import attngen as ag
from attngen.testing import Case, assert_matches_reference
from variants import VARIANTS

pytestmark = pytest.mark.gpu

CASES = [Case(2, 8, 2, 300, 300, 64, 64), Case(1, 4, 4, 129, 1000, 128, 64), Case(2, 2, 1, 1, 77, 32, 96)]


def _on_cuda(captures: dict) -> dict:
    return {name: t.detach().cuda().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
            for name, t in captures.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_cuda_kernels_match_reference(variant, case, dtype):
    case = dataclasses.replace(case, dtype=dtype)
    spec = variant.spec(_on_cuda(variant.captures(case, torch.Generator().manual_seed(1))))
    assert_matches_reference(spec, *case.tensors(device="cuda"))


@pytest.mark.parametrize("normalization", [
    lambda: ag.norms.Softmax(sink=torch.zeros(8, device="cuda", requires_grad=True)),
    lambda: ag.norms.Sigmoid(bias="-log n"), lambda: ag.norms.ReLU(power=2, normalize="unmasked"),
    lambda: ag.norms.AffineSoftmax(alpha=torch.ones(8, device="cuda", requires_grad=True), beta=0.01)],
    ids=["sink", "sigmoid", "relu2", "affine"])
def test_cuda_normalizations(normalization):
    spec = ag.AttentionSpec(mask_mod=ag.masks.causal, normalization=normalization())
    assert_matches_reference(spec, *Case(2, 8, 2, 257, 257, 64, 64, dtype=torch.bfloat16).tensors(device="cuda"))


def test_cuda_block_mask_and_document_summaries():
    doc_ids = torch.randint(0, 5, (2, 700), device="cuda").sort().values
    spec = ag.AttentionSpec(mask_mod=ag.masks.document(doc_ids) & ag.masks.causal, stats=("lse", "entropy"))
    q, k, v = Case(2, 8, 2, 700, 700, 64, 64, dtype=torch.bfloat16).tensors(device="cuda")
    assert_matches_reference(spec, q, k, v)
    blocks = torch.rand(2, 8, 6, 6, device="cuda") > 0.5
    assert_matches_reference(ag.AttentionSpec(), q, k, v, block_mask=ag.BlockMask(blocks, block_size=128))
