"""Every spec in specs/ compiles and matches the reference, forward and backward."""

import pathlib
import runpy

import pytest
import torch

import attngen as ag

SPEC_FILES = sorted((pathlib.Path(__file__).parent.parent / "specs").glob("*.py"))


def test_the_zoo_is_not_empty():
    assert len(SPEC_FILES) >= 8


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_spec_file_matches_reference(path):
    namespace = runpy.run_path(str(path))
    spec = namespace["SPEC"]
    assert (namespace.get("__doc__") or "").strip(), f"{path.name} needs a docstring with its formula"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 45, 32, generator=gen, requires_grad=True) for _ in range(3))
    out = ag.compile(spec)(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ag.reference.attention(q64, k64, v64, spec)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
