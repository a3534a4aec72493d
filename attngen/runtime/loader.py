"""Import generated kernel modules, compiled or under Triton's interpreter."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
import sys
import threading
from pathlib import Path
from types import ModuleType

import numpy
import triton
from triton.runtime.interpreter import InterpretedFunction

_modules: dict[tuple[str, bool], ModuleType] = {}
_importing = threading.Lock()  # Triton's interpreter switch is global: one import at a time
_interpreting = threading.Lock()  # so is the interpreter's patching of triton.language: one launch at a time


def _release(version: str) -> tuple[int, int]:
    major, minor = re.findall(r"\d+", version)[:2]
    return int(major), int(minor)


def _interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why this Triton's interpreter cannot run with this numpy, or None: before Triton 3.7 it calls
    int() on one-element arrays, which numpy 2.4 refuses (a TypeError deep inside a kernel)."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (attngen's CPU path) does not work with numpy "
                f"{numpy_version}: install numpy<2.4, or triton>=3.7")
    return None


_interpreter_problems: dict[tuple[str, str], str | None] = {}  # a plain dict: Dynamo traces it without a warning


def check_interpreter() -> None:
    """Raise if Triton's interpreter cannot run with the installed numpy (decided once per pair of versions)."""
    versions = (triton.__version__, numpy.__version__)
    if versions not in _interpreter_problems:
        _interpreter_problems[versions] = _interpreter_problem(*versions)
    problem = _interpreter_problems[versions]
    if problem:
        raise RuntimeError(problem)


def load_kernels(path: Path, interpret: bool) -> ModuleType:
    """The module at ``path``; with ``interpret`` its kernels run on CPU tensors."""
    key = (str(path), interpret)
    if interpret:
        check_interpreter()
    if key not in _modules:
        with _importing:
            if key not in _modules:
                _modules[key] = _import(path, interpret)
    return _modules[key]


def _import(path: Path, interpret: bool) -> ModuleType:
    """Execute the module at ``path`` with Triton's interpreter switched ``interpret`` while its kernels are
    decorated (``triton.jit`` reads the switch then)."""
    # one name per file: torch.compile's guards find a module's globals under its name in sys.modules
    folder = hashlib.sha256(str(path.resolve().parent).encode()).hexdigest()[:12]
    name = f"attngen_kernels_{path.stem}_{folder}_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    previous = triton.knobs.runtime.interpret
    triton.knobs.runtime.interpret = interpret
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        triton.knobs.runtime.interpret = previous
    for kernel in vars(module).values():
        if isinstance(kernel, InterpretedFunction):
            kernel.run = _serial_and_quiet(kernel.run)
    return module


def _serial_and_quiet(run):
    """An interpreted kernel's launch, one at a time in the process (Triton's interpreter swaps functions of
    triton.language in and out around each launch: two threads launching at once broke each other's with
    'Did you forget to add @triton.jit ?'), without numpy's floating-point warnings: the interpreter
    computes every lane of a tile, masked ones too (a masked key's 0 / 0, exp of a -inf score), which the
    kernels drop."""
    @functools.wraps(run)
    def serial_and_quiet(*args, **kwargs):
        with _interpreting, numpy.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return run(*args, **kwargs)
    return serial_and_quiet
