"""Where one attngen call's time goes: per-kernel GPU time and the host's time per call.

For each variant of benchmarks/run.py named on the command line, at one shape, it prints
- host ms per call: the wall time to issue 20 calls back to back (no synchronize between them),
  which bounds the call rate when the GPU is faster than the host;
- GPU ms per call: CUDA events around the same 20 calls (as run.py times them);
- the torch profiler's table of the kernels of 5 calls (self CUDA time), forward and forward+backward.

    python benchmarks/profile_call.py document block_sparse --length 4096 --dim 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import run as bench  # benchmarks/run.py  # noqa: E402


def per_call(step, calls: int = 20, warmup: int = 5) -> tuple[float, float]:
    """(host ms, GPU ms) per call of ``step`` over ``calls`` back-to-back calls, after ``warmup``
    calls (after one, on 2026-12-04, the document forward read 0.67 ms of host time where run.py's
    timing of the same call read 0.36)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    started = time.perf_counter()
    start.record()
    for _ in range(calls):
        step()
    end.record()
    host = (time.perf_counter() - started) * 1e3 / calls
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    device, dtype, heads = "cuda", torch.bfloat16, 16
    batch = args.batch_tokens // args.length
    table = bench.variants(batch, heads, args.length, args.dim, device)
    for name in args.variants:
        spec, flex_mods, _, _ = table[name]
        attn = bench.implementations(spec, flex_mods, None, (batch, heads, args.length, args.dim), device)["attngen"]
        q, k, v = (torch.randn(batch, heads, args.length, args.dim, device=device, dtype=dtype).requires_grad_()
                   for _ in range(3))
        grad = torch.randn_like(q)
        steps = {"fwd": lambda: attn(q, k, v),
                 "fwd+bwd": lambda: torch.autograd.grad(attn(q, k, v), (q, k, v), grad)}
        for phase, step in steps.items():
            host, gpu = per_call(step)
            print(f"\n== {name} {phase} B{batch} H{heads} L{args.length} D{args.dim}: "
                  f"host {host:.3f} ms/call, GPU {gpu:.3f} ms/call", flush=True)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60),
                  flush=True)


if __name__ == "__main__":
    main()
