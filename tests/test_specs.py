"""Every spec in specs/ compiles and matches the reference, forward and backward."""

import pathlib
import runpy

import pytest

from attngen.testing import Case, assert_matches_reference

SPEC_FILES = sorted((pathlib.Path(__file__).parent.parent / "specs").glob("*.py"))


def test_the_zoo_is_not_empty():
    assert len(SPEC_FILES) >= 8


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_spec_file_matches_reference(path):
    namespace = runpy.run_path(str(path))
    spec = namespace["SPEC"]
    assert (namespace.get("__doc__") or "").strip(), f"{path.name} needs a docstring with its formula"
    assert_matches_reference(spec, *Case(1, 8, 8, 45, 45, 32, 32).tensors())
