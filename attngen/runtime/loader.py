"""Import generated kernel modules, compiled or under Triton's interpreter."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy
import triton

_modules: dict[tuple[str, bool], ModuleType] = {}


def _release(version: str) -> tuple[int, int]:
    major, minor = re.findall(r"\d+", version)[:2]
    return int(major), int(minor)


def check_interpreter() -> None:
    """Raise if Triton's interpreter cannot run with the installed numpy: before Triton 3.7 it calls
    int() on one-element arrays, which numpy 2.4 refuses (a TypeError deep inside a kernel)."""
    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter (attngen's CPU path) does not work with "
                           f"numpy {numpy.__version__}: install numpy<2.4, or triton>=3.7")


def load_kernels(path: Path, interpret: bool) -> ModuleType:
    """The module at ``path``; with ``interpret`` its kernels run on CPU tensors."""
    key = (str(path), interpret)
    if interpret:
        check_interpreter()
    if key not in _modules:
        name = f"attngen_kernels_{path.stem}_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        previous = triton.knobs.runtime.interpret
        triton.knobs.runtime.interpret = interpret
        try:
            sys.modules[name] = module
            spec.loader.exec_module(module)
        finally:
            triton.knobs.runtime.interpret = previous
        _modules[key] = module
    return _modules[key]
