"""Autotuning: pick each shape bucket's tile configuration by timing, once, on disk.

A bucket (device, dtype, head dims, powers of two bounding Lq and Lk; see the
generated ``shape_bucket``) is tuned the first time a CUDA call meets it:
every candidate that fits in shared memory runs the forward pass, the fastest
wins, then (on the first call that needs gradients) the same for the backward
pass with its own tiles; the choices are stored next to the kernel module, so a new
sequence length in the same bucket, or a new process, neither recompiles nor
retunes. On CPU (Triton's interpreter) the fixed default is used, unless
``ATTNGEN_AUTOTUNE=cpu`` forces tuning over two tiny configs (for tests).
``ATTNGEN_AUTOTUNE=0`` disables tuning; ``ATTNGEN_QUIET=1`` silences progress.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
import triton

from ..head_dims import qk_parts
from .cache import cache_dir, write_atomic

GPU_CANDIDATES = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
                  for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)]
# head dims above 256 (MLA's 576 / 512, q and k in parts of 512 + 64): only small tiles fit in shared memory
WIDE_CANDIDATES = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
                   for m in (16, 32, 64) for n in (16, 32) for w in (4, 8) for s in (1, 2)]
CPU_CANDIDATES = [{"BLOCK_M": 16, "BLOCK_N": 16}, {"BLOCK_M": 32, "BLOCK_N": 32}]


def enabled(q: torch.Tensor) -> bool:
    """Whether calls on ``q``'s device tune their shape buckets."""
    mode = os.environ.get("ATTNGEN_AUTOTUNE", "1")
    if mode == "0" or torch.compiler.is_compiling():
        return False
    return q.is_cuda or mode == "cpu"


def shared_memory_bytes(config: dict, qk_dim: int, v_dim: int, itemsize: int, phase: str) -> int:
    """An estimate of the shared memory of the ``phase`` ("forward" or "backward") kernels
    under ``config``: the tiles a program keeps, plus ``num_stages`` copies of the tiles its
    loop streams. Calibrated on sm_90 builds (``attngen.testing.gpu_compile``): at most 1 KB
    above the real size for the large configs that decide pruning, and not below it for the
    small tiles of head dims above 256."""
    qk, dv = sum(qk_parts(qk_dim)), max(16, triton.next_power_of_2(v_dim))
    m, n, stages = config["BLOCK_M"], config["BLOCK_N"], config.get("num_stages", 1)
    if phase == "forward":  # q kept; k and v streamed
        return itemsize * (m * qk + stages * n * (qk + dv))
    # backward: BLOCK_M rows kept (q and dO for dQ; k and v for dK/dV), BLOCK_N rows streamed, for
    # dK/dV also two float32 row statistics per streamed query; tiles all under a warpgroup's 64 rows
    # (products by mma.sync) stage one more [rows, Dv] tile
    staged = itemsize * max(m, n) * dv if max(m, n) < 64 else 0
    return itemsize * (m + stages * n) * (qk + dv) + stages * 8 * n + staged


def candidates(q: torch.Tensor, v: torch.Tensor, phase: str) -> list[dict]:
    """The configurations worth timing for ``phase`` on ``q``'s device (those that fit in shared memory)."""
    if not q.is_cuda:
        return CPU_CANDIDATES
    props = torch.cuda.get_device_properties(q.device)
    limit = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    pool = WIDE_CANDIDATES if max(q.shape[-1], v.shape[-1]) > 256 else GPU_CANDIDATES
    return fitting(pool, limit, q.shape[-1], v.shape[-1], q.element_size(), phase) or pool[:1]


def fitting(configs: list[dict], limit: int, qk_dim: int, v_dim: int, itemsize: int, phase: str) -> list[dict]:
    """The configs whose ``phase`` shared-memory estimate is within ``limit`` bytes."""
    return [c for c in configs if shared_memory_bytes(c, qk_dim, v_dim, itemsize, phase) <= limit]


def _tuning_file(key: str) -> Path:
    return cache_dir() / f"{key}.tuning.json"


def stored(key: str) -> dict:
    """The tuned configurations of the kernel module ``key``, by bucket."""
    path = _tuning_file(key)
    return json.loads(path.read_text()) if path.exists() else {}


def _progress(message: str) -> None:
    if os.environ.get("ATTNGEN_QUIET") != "1":
        print(message, file=sys.stderr, flush=True)


def median_seconds(run, device: torch.device, repeats: int = 3) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after a warm-up (which compiles)."""
    run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def ensure_tuned(kernels: ModuleType, key: str, q, k, v, captures, params) -> None:
    """Make ``kernels.TUNED_CONFIGS`` hold this call's bucket: from disk, or by timing.

    The backward pass is tuned only once a call needs gradients, so inference
    never pays for it.
    """
    bucket = kernels.shape_bucket(q, k, v)
    needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *captures, *params))
    phases = ("forward", "backward") if needs_backward else ("forward",)
    if all(phase in kernels.TUNED_CONFIGS.get(bucket, {}) for phase in phases):
        return
    known = stored(key)
    chosen = dict(known.get(bucket, {}))
    if not all(phase in chosen for phase in phases):
        chosen = _tune(kernels, bucket, phases, chosen, q, k, v, captures, params)
        _store(key, bucket, chosen)
    kernels.TUNED_CONFIGS[bucket] = chosen


def _store(key: str, bucket: str, chosen: dict) -> None:
    """Add ``bucket``'s choice to the module's tuning file, under a lock: processes tuning other buckets
    of the same module at once (the ranks of one job, say) keep each other's choices."""
    with open(cache_dir() / f"{key}.tuning.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_atomic(_tuning_file(key), json.dumps({**stored(key), bucket: chosen}, indent=1, sort_keys=True))


def _tune(kernels: ModuleType, bucket: str, phases, chosen: dict, q, k, v, captures, params) -> dict:
    """``chosen`` completed with the fastest config of each missing phase; the backward
    pass is timed after a forward pass with the forward config chosen."""
    q, k, v = (t.detach() for t in (q, k, v))
    captures = kernels.prepare_captures([t.detach() for t in captures])
    params = [t.detach() for t in params]
    scale = kernels.scale_for(q)
    chosen = dict(chosen)

    def forward():
        return kernels.run_forward(q, k, v, captures, params, scale, kernels.launch_config(q, k, v, "forward"))

    def backward():
        out, stats, residuals = saved
        kernels.run_backward(q, k, v, out, stats, residuals, torch.ones_like(out), [None] * len(stats),
                             captures, params, scale, kernels.launch_config(q, k, v, "backward"))

    for phase, run in (("forward", forward), ("backward", backward)):
        if phase not in phases or phase in chosen:
            continue
        if phase == "backward":
            kernels.TUNED_CONFIGS[bucket] = chosen
            saved = forward()  # with the forward config just chosen
            del kernels.TUNED_CONFIGS[bucket]
        chosen[phase] = _fastest(kernels, bucket, phase, chosen, run, q, v)
    return chosen


def _fastest(kernels: ModuleType, bucket: str, phase: str, chosen: dict, run, q, v) -> dict:
    """Time ``run`` under each candidate config for ``phase`` and return the fastest."""
    timings = []
    options = candidates(q, v, phase)
    for i, config in enumerate(options):
        _progress(f"attngen: tuning {bucket} {phase} [{i + 1}/{len(options)}] {config}")
        kernels.TUNED_CONFIGS[bucket] = {**chosen, phase: config}
        try:
            timings.append((median_seconds(run, q.device), i))
        except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError) as error:
            _progress(f"attngen: skipping {config}: {type(error).__name__}")
        finally:
            del kernels.TUNED_CONFIGS[bucket]
    if not timings:
        raise RuntimeError(f"no tile configuration could run the {phase} pass for {bucket}")
    best_time, best = min(timings)
    _progress(f"attngen: tuned {bucket} {phase}: {options[best]} ({best_time * 1e3:.3f} ms)")
    return options[best]
