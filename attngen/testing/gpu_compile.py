"""Compile a spec's kernels for an NVIDIA GPU on a machine without one.

Triton's front end and its NVIDIA back end (LLVM, ptxas) need no device, so
every kernel a call would launch can be built ahead of time for a chosen
architecture: this catches code that Triton's interpreter accepts but the
compiler rejects, and reports what decides a kernel's speed before it runs:
shared memory, registers and spills (from the cubin, by ``cuobjdump``), and
which tensor-core instructions its dots became. Nothing runs.
"""

from __future__ import annotations

import bisect
import contextlib
import re
import subprocess
import tempfile
from dataclasses import dataclass, field, fields
from functools import cached_property

import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import KernelInterface

from ..runtime.compiled import CompiledAttention, per_head_parameters
from ..linear import LinearState
from ..runtime.linear import CompiledLinearAttention
from ..runtime.loader import load_kernels


@dataclass(frozen=True, repr=False)
class CompiledKernel:
    """One kernel built for a GPU and what its machine code says about speed.

    ``shared_bytes``: shared memory per program; ``registers``: per thread;
    ``spill_bytes``: local memory per thread, its stack frame included (where ptxas spills
    registers; 0 when none);
    ``wgmma`` / ``mma_sync``: how many of its PTX tensor-core instructions are
    Hopper's asynchronous warpgroup MMA or the older synchronous warp MMA;
    ``mufu``: its special-function-unit instructions (exp2, log2, reciprocal,
    ...) in the machine code, a unit with 1/8 of the multiply-adds' throughput;
    ``instructions``: all its machine-code (SASS) instructions (static counts,
    loops counted once); ``loops``: the instructions of each loop body (from a
    backward branch's target to the branch; an outer loop counts its inner
    ones), in the order they end: what runs per tile. The machine-code numbers
    are read from ``cubin`` (by ``cuobjdump``) when first asked for.
    """

    name: str
    phase: str
    shared_bytes: int
    wgmma: int
    mma_sync: int
    num_warps: int
    num_stages: int
    cubin: bytes = field(compare=False)

    MACHINE_CODE_NUMBERS = ("registers", "spill_bytes", "mufu", "instructions", "loops")

    @cached_property
    def _machine_code(self) -> str:
        """Resource usage (e.g. ``REG:168 STACK:0 ... LOCAL:0``) and SASS, by one ``cuobjdump``."""
        with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
            file.write(self.cubin)
            file.flush()
            return subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", "--dump-sass", file.name],
                                  capture_output=True, text=True, check=True).stdout

    @cached_property
    def _usage(self) -> dict[str, int]:
        return {name: int(value) for name, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", self._machine_code)}

    @cached_property
    def _sass(self) -> list[tuple[str, str]]:
        """(hex address, instruction) of each SASS instruction, addresses ascending."""
        return re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*)$", self._machine_code, re.MULTILINE)

    @property
    def registers(self) -> int:
        return self._usage["REG"]

    @property
    def spill_bytes(self) -> int:
        return self._usage["STACK"] + self._usage["LOCAL"]

    @property
    def mufu(self) -> int:
        return len(re.findall(r"\bMUFU\.", self._machine_code))

    @property
    def instructions(self) -> int:
        return len(self._sass)

    @cached_property
    def loops(self) -> tuple[int, ...]:
        return _loop_bodies([int(address, 16) for address, _ in self._sass], [text for _, text in self._sass])

    def numbers(self) -> dict:
        """Its name, phase and every number above, by name (for tables and JSON)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "cubin"},
                **{name: getattr(self, name) for name in self.MACHINE_CODE_NUMBERS}}

    def describe(self) -> str:
        """One line: its speed-relevant numbers."""
        return (f"{self.registers} registers, {self.spill_bytes} B spilled, {self.shared_bytes / 1024:.1f} KB shared, "
                f"{self.wgmma} wgmma, {self.mma_sync} mma.sync, {self.mufu} MUFU of {self.instructions} instructions "
                f"(loop bodies {', '.join(map(str, self.loops)) or 'none'}), "
                f"{self.num_warps} warps x {self.num_stages} stages")

    def __repr__(self) -> str:
        return f"CompiledKernel({self.phase} {self.name}: {self.describe()})"


class _TargetDriver:
    """The parts of a Triton driver that compiling (not launching) asks for."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def intercepted_launches(launch):
    """Inside, ``kernel[grid](*args, **kwargs)`` calls ``launch(kernel, grid, args, kwargs)`` instead of
    running the kernel. As no kernel writes them, ``torch.empty`` tensors are zeros there: the launchers
    read some back (the entries that captured tensors' gradient parts add to)."""
    getitem, empty = KernelInterface.__getitem__, torch.empty
    KernelInterface.__getitem__ = lambda kernel, grid: lambda *args, **kwargs: launch(kernel, grid, args, kwargs)
    torch.empty = torch.zeros
    try:
        yield
    finally:
        KernelInterface.__getitem__ = getitem
        torch.empty = empty


@contextlib.contextmanager
def _compile_only(arch: int, built: list):
    """Inside, ``kernel[grid](...)`` compiles for ``sm_<arch>`` and records the kernel instead of launching."""
    previous = driver._active  # None on a machine without a GPU, where reset_active() would fail
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    try:
        with intercepted_launches(lambda kernel, grid, args, kwargs: built.append(
                kernel.run(*args, grid=grid, warmup=True, **kwargs))):
            yield
    finally:
        driver.set_active(previous)


def _loop_bodies(addresses: list[int], instructions: list[str]) -> tuple[int, ...]:
    """For each branch back to an earlier address, how many instructions lie from there to the branch
    (``addresses`` ascend, as the SASS listing does)."""
    bodies = []
    for index, (address, instruction) in enumerate(zip(addresses, instructions)):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", instruction)
        if target and (start := int(target.group(1), 16)) < address:
            bodies.append(index + 1 - bisect.bisect_left(addresses, start))
    return tuple(bodies)


def _describe(kernel, phase: str) -> CompiledKernel:
    ptx = kernel.asm["ptx"]
    return CompiledKernel(kernel.name, phase, kernel.metadata.shared, len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
                          len(re.findall(r"\bmma\.sync\b", ptx)), kernel.metadata.num_warps,
                          kernel.metadata.num_stages, kernel.asm["cubin"])


def _built(built: list, phases: list) -> list[CompiledKernel]:
    return [_describe(kernel, phase) for kernel, phase in zip(built, phases)]


def _compile_linear(attn: CompiledLinearAttention, q, k, v, arch: int, tiles: dict | None,
                    backward: bool) -> list[CompiledKernel]:
    kernels = load_kernels(attn.path, interpret=False)
    config = {**kernels.launch_config(q, device_type="cuda"), **(tiles or {})}
    g = torch.zeros(q.shape[:3])
    states = LinearState.zeros(*q.shape[:2], q.shape[3], v.shape[3])
    built: list = []
    with _compile_only(arch, built):
        out, normalizer, *final = kernels.run_forward(q, k, v, g, *states, 1.0, config=config)
        phases = ["forward"] * len(built)
        if backward:
            kernels.run_backward(q, k, v, g, *states, *final, out, normalizer, *final, 1.0, config=config)
            phases += ["backward"] * (len(built) - len(phases))
    return _built(built, phases)


def compile_for_gpu(attn: CompiledAttention | CompiledLinearAttention, q, k, v, *, arch: int = 90,
                    tiles: dict | None = None, backward: bool = True,
                    stat_grads: bool = False) -> list[CompiledKernel]:
    """Build, for ``sm_<arch>``, every kernel that ``attn(q, k, v)`` (and its backward) launches.

    ``q``, ``k``, ``v`` are CPU tensors giving dtype and shapes. The launch
    configuration is each phase's CUDA default, updated with ``tiles`` (e.g.
    ``{"BLOCK_M": 128, "num_stages": 3}``, or ``{"CHUNK": 32}`` for linear
    attention). The backward is that of a loss of the output alone, or with
    ``stat_grads`` of the statistics too. Raises Triton's compilation error if
    a kernel does not build.
    """
    if isinstance(attn, CompiledLinearAttention):
        return _compile_linear(attn, q, k, v, arch, tiles, backward)
    kernels = load_kernels(attn.path, interpret=False)
    captures = kernels.prepare_captures([c.tensor.detach() for c in attn.graph.captures])
    params = [p.detach() for p in per_head_parameters(attn.spec, q.shape[1], q.device)]
    config = {phase: {**kernels.launch_config(q, k, v, phase, device_type="cuda"), **(tiles or {})}
              for phase in ("forward", "backward")}
    scale = kernels.scale_for(q)
    built: list = []
    phases = []
    with _compile_only(arch, built):
        out, stats, residuals = kernels.run_forward(q, k, v, captures, params, scale, config["forward"])
        phases += ["forward"] * (len(built) - len(phases))
        if backward:
            dstats = [torch.ones_like(stat) if stat_grads and name not in kernels.FORWARD_ONLY_STATS else None
                      for name, stat in zip(kernels.STAT_OUTPUTS, stats)]
            kernels.run_backward(q, k, v, out, stats, residuals, torch.ones_like(out), dstats, captures, params,
                                 scale, config["backward"])
            phases += ["backward"] * (len(built) - len(phases))
    return _built(built, phases)
