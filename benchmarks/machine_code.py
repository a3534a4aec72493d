"""What the harness's kernels compile to on Hopper, measured without a GPU.

Every variant of ``benchmarks/run.py`` is built ahead of time for sm_90
(``attngen.testing.gpu_compile``) at the launch configuration a call would use
untuned (or ``--tiles``), and each kernel's machine code is summarized:
registers per thread, bytes spilled to local memory, shared memory, and how
many tensor-core instructions are Hopper's warpgroup MMA (wgmma) or the older
synchronous MMA, which runs at a fraction of the rate, and how many instructions
go to the special-function unit (MUFU: exp2, log2, reciprocal), which has 1/8 of
the multiply-adds' throughput, among all its machine-code instructions, and how
many of those each loop body holds (what runs per tile). A spill
or an ``mma.sync`` in an attention kernel is a speed hazard to fix before timing.

    python benchmarks/machine_code.py [--only causal sigmoid] [--dims 64 128 192/128] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import attngen as ag
from attngen.cli import head_dims
from attngen.testing.gpu_compile import compile_for_gpu
from proxies import publish  # benchmarks/proxies.py
from run import variants  # benchmarks/run.py


def report(names: list[str] | None, dims: list[tuple[int, int]], tiles: dict, length: int = 4096) -> list[dict]:
    """One row per (variant, head dims (Dqk, Dv), kernel)."""
    rows = []
    for qk_dim, v_dim in dims:
        specs = {name: entry[0] for name, entry in variants(16384 // length, 16, length, qk_dim, "cpu").items()}
        for name in names or specs:
            q, k, v = (torch.empty(16384 // length, 16, length, dim, dtype=torch.bfloat16)
                       for dim in (qk_dim, qk_dim, v_dim))
            for kernel in compile_for_gpu(ag.compile(specs[name]), q, k, v, tiles=tiles):
                rows.append({"variant": name, "dim": qk_dim if qk_dim == v_dim else f"{qk_dim}/{v_dim}",
                             **kernel.numbers()})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | D | kernel | warps x stages | registers | spilled bytes | shared KB | wgmma | mma.sync "
             "| MUFU | instructions | loop bodies |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hazard = "**" if r["spill_bytes"] or r["mma_sync"] else ""
        lines.append(f"| {r['variant']} | {r['dim']} | {hazard}{r['name']}{hazard} | {r['num_warps']} x "
                     f"{r['num_stages']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} | "
                     f"{r['wgmma']} | {r['mma_sync']} | {r['mufu']} | {r['instructions']} | "
                     f"{', '.join(map(str, r['loops']))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import datetime

    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="variants of benchmarks/run.py (default: all)")
    parser.add_argument("--dims", nargs="+", type=head_dims, default=[(64, 64), (128, 128)],
                        help="head dims, D or DQK/DV (default: 64 128)")
    parser.add_argument("--tiles", type=json.loads, default={},
                        help='launch configuration over the default, e.g. \'{"BLOCK_M": 128, "BLOCK_N": 32}\'')
    parser.add_argument("--out", type=Path, help="write machine_code.md and machine_code.json into this folder")
    args = parser.parse_args()
    known = variants(4, 16, 4096, 64, "cpu")
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    rows = report(args.only, args.dims, args.tiles)
    header = (f"# attngen kernels built for sm_90 (no GPU), {datetime.date.today().isoformat()}\n\n"
              f"torch {torch.__version__}, triton {triton.__version__}, attngen {ag.__version__}; bf16, "
              f"{'tiles ' + json.dumps(args.tiles) if args.tiles else 'the untuned CUDA launch configuration'}. "
              f"Bold: a kernel with spilled registers or synchronous MMAs.\n\n")
    publish(header + markdown(rows), rows, args.out, "machine_code")


if __name__ == "__main__":
    main()
