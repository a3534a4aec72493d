"""Import generated kernel modules, compiled or under Triton's interpreter."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import triton

_modules: dict[tuple[str, bool], ModuleType] = {}


def load_kernels(path: Path, interpret: bool) -> ModuleType:
    """The module at ``path``; with ``interpret`` its kernels run on CPU tensors."""
    key = (str(path), interpret)
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
