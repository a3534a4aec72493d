"""Every spec in specs/ compiles and matches the reference, forward and backward."""

import pathlib
import runpy

import pytest
import torch

from attngen import LinearAttentionSpec
from attngen.testing import Case, assert_matches_reference
from attngen.testing.cases import for_spec

SPEC_FILES = sorted((pathlib.Path(__file__).parent.parent / "specs").glob("*.py"))


def test_the_zoo_is_not_empty():
    assert len(SPEC_FILES) >= 8


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_spec_file_matches_reference(path):
    namespace = runpy.run_path(str(path))
    spec = namespace["SPEC"]
    assert (namespace.get("__doc__") or "").strip(), f"{path.name} needs a docstring with its formula"
    case = Case(1, 8, 8, 45, 45, 32, 32)
    case = case if isinstance(spec, LinearAttentionSpec) else for_spec(case, spec)  # top-k: on the grid
    gated = isinstance(spec, LinearAttentionSpec) and isinstance(spec.decay, str)  # decay="gated"
    call = {"log_decay": torch.nn.functional.logsigmoid(torch.randn(1, 8, 45) + 3).requires_grad_()} if gated else {}
    assert_matches_reference(spec, *case.tensors(), **call)
