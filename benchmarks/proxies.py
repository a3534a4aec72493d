"""CPU proxies: what can be measured without a GPU, for trends between GPU runs.

* compile latency: ``ag.compile`` with an empty cache, from the disk cache in a
  new process, and again in the same process;
* tiles visited: the fraction of (q tile, kv tile) pairs the forward kernel
  computes for each masked variant of the harness, and how many of those run
  without evaluating the mask (``CompiledAttention.block_stats``);
* mask-plan building for a 32k-token document mask: the launcher's per-tile
  summaries (what every call pays), the host-side classification of all
  tiles, dense evaluation of the same mask_mod on all positions with torch,
  and FlexAttention's ``create_block_mask`` on CPU;
* interpreter time of attngen relative to the materialized reference on small
  shapes (Triton's interpreter: a trend, not a speed);
* host time per call: everything an ``attn(q, k, v)`` call does in Python
  (argument checks, launch configuration, tile summaries, the custom op's
  dispatch) with the kernel launches themselves skipped, which bounds the
  latency of small calls such as decoding steps on a GPU, and the torch
  operations it dispatches (a GPU's host pays each: the masked calls of the
  2026-12-04 H200 run were host-bound); for decoding steps, and for the
  document and block-sparse masks at a training length, forward and backward.

    python benchmarks/proxies.py [--quick] [--out FOLDER]   # FOLDER gets proxies.md and proxies.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import attngen as ag
from attngen.testing.dispatches import dispatched

COMPILE_SCRIPT = """
import time, torch, attngen as ag
slopes = torch.rand(8)
started = time.perf_counter()
attn = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx),
                                   mask_mod=ag.masks.causal))
first = time.perf_counter() - started
started = time.perf_counter()
ag.compile(attn.spec)
print(first, time.perf_counter() - started, attn.cache_hit)
"""


def seconds(run, repeats: int = 3) -> float:
    """Median wall time of ``run()`` (no warm-up: every call does the full work)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def compile_latency() -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "ATTNGEN_CACHE_DIR": cache}
        runs = [subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                               check=True).stdout.split() for _ in range(2)]
    (cold, _, cold_hit), (cached, again, warm_hit) = runs
    assert cold_hit == "False" and warm_hit == "True"
    return {"cold_ms": float(cold) * 1e3, "cached_new_process_ms": float(cached) * 1e3,
            "same_process_ms": float(again) * 1e3}


def masked_variants(length: int) -> dict:
    docs = torch.arange(length) * 4 // length
    window = min(1024, length // 4)
    return {
        "causal": ag.masks.causal,
        f"sliding_window_{window}": ag.masks.causal & ag.masks.sliding_window(window),
        "document (4 equal)": ag.masks.document(docs[None]),
        "document (64 random lengths)": ag.masks.document(
            torch.sort(torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(0))).values),
        "prefix_lm (L/4)": ag.masks.prefix_lm(length // 4),
        "chunked (512)": ag.masks.chunked(512),
        "dilated_window (64 x 4)": ag.masks.dilated_sliding_window(64, 4),
        "neighborhood_2d (64 x L/64, kernel 7)": ag.masks.neighborhood_2d(64, length // 64, 7),
    }


def tiles_visited(lengths=(1024, 4096, 16384), tile: int = 64) -> list[dict]:
    rows = []
    for length in lengths:
        for name, mask in masked_variants(length).items():
            stats = ag.compile(ag.AttentionSpec(mask_mod=mask)).block_stats(length, length, block_m=tile, block_n=tile)
            rows.append({"mask": name, "length": length, "tile": tile, **stats,
                         "visited": (stats["total"] - stats["empty"]) / stats["total"]})
    return rows


def plan_building(length: int = 32768, tile: int = 64, documents: int = 64) -> dict:
    ids = torch.sort(torch.randint(0, documents, (1, length), generator=torch.Generator().manual_seed(0))).values
    mask = ag.masks.document(ids)
    attn = ag.compile(ag.AttentionSpec(mask_mod=mask))
    kernels = __import__("attngen.runtime.loader", fromlist=["load_kernels"]).load_kernels(attn.path, True)
    captures = kernels.prepare_captures([c.tensor for c in attn.graph.captures])
    config = {"BLOCK_M": tile, "BLOCK_N": tile}
    result = {"length": length, "documents": documents, "tile": tile,
              "summaries_ms": seconds(lambda: kernels.tile_summaries(captures, length, length, config)) * 1e3,
              "classify_all_tiles_ms": seconds(lambda: attn.block_stats(length, length, block_m=tile,
                                                                         block_n=tile)) * 1e3}

    def dense():
        q_idx = torch.arange(length)
        for start in range(0, length, 2048):  # rows in chunks: 2048 x 32768 bools at a time
            rows = q_idx[start:start + 2048, None]
            mask(torch.tensor(0), torch.tensor(0), rows, q_idx[None, :]).any()
    result["dense_torch_ms"] = seconds(dense, repeats=1) * 1e3
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        result["flex_create_block_mask_ms"] = seconds(
            lambda: create_block_mask(mask, 1, 1, length, length, device="cpu", BLOCK_SIZE=tile), repeats=1) * 1e3
    except Exception as error:  # not every torch build can run it on CPU
        result["flex_create_block_mask_ms"] = f"{type(error).__name__}: {str(error)[:80]}"
    return result


def interpreter_ratio(length: int = 128) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, length, 64, generator=gen) for _ in range(3))
    for name, spec in {"plain": ag.AttentionSpec(), "causal": ag.AttentionSpec(mask_mod=ag.masks.causal),
                       "sigmoid": ag.AttentionSpec(normalization=ag.norms.Sigmoid(bias="-log n"))}.items():
        attn = ag.compile(spec)
        attn(q, k, v)  # warm-up
        ours = seconds(lambda: attn(q, k, v))
        ref = seconds(lambda: ag.reference.attention(q, k, v, spec))
        rows.append({"variant": name, "length": length, "attngen_ms": ours * 1e3, "reference_ms": ref * 1e3,
                     "ratio": ours / ref})
    return rows


def _per_call(run, calls: int) -> float:
    """Seconds per call of ``run()`` over ``calls`` calls in a row."""
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - started) / calls


def _decoding_calls() -> tuple[str, dict]:
    """A decoding step's shape and its calls: name -> (spec, q, k, v, call keywords, backward?)."""
    batch, q_heads, kv_heads, length, dim = 8, 32, 8, 4096, 128
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, q_heads, 1, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=gen) for _ in range(2))
    kv_lens = torch.full((batch,), length)
    slopes = torch.rand(q_heads, generator=gen)
    causal = ag.AttentionSpec(mask_mod=ag.masks.causal)
    return f"B={batch} Hq={q_heads} Hkv={kv_heads} Lq=1 Lk={length} D={dim}", {
        "plain": (ag.AttentionSpec(), q, k, v, {}, False),
        "ALiBi": (ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx)),
                  q, k, v, {}, False),
        "causal, kv_lens": (causal, q, k, v, dict(kv_lens=kv_lens), False),
        "causal, kv_lens, split-KV": (causal, q, k, v, dict(kv_lens=kv_lens, mode="decode"), False),
    }


def _masked_calls() -> tuple[str, dict]:
    """Training-length calls whose masks need per-call tile summaries (the benchmark's document mask
    and block-sparse FlexAttention BlockMask), forward and forward + backward. Few heads and a small
    head dim: the host's work does not depend on them, the CPU's tensor work would."""
    import run as bench  # benchmarks/run.py (imports this module)

    batch, heads, length, dim = 4, 2, 4096, 16
    specs = bench.variants(batch, heads, length, dim, "cpu")
    q, k, v = (torch.randn(batch, heads, length, dim, requires_grad=True) for _ in range(3))
    calls = {}
    for name, label in (("document", "document mask"), ("block_sparse", "block-sparse (FlexAttention BlockMask)")):
        spec, (_, mask), _, _ = specs[name]
        call = {"block_mask": mask} if name == "block_sparse" else {}
        calls[f"{label}, forward"] = (spec, q, k, v, call, False)
        calls[f"{label}, forward + backward"] = (spec, q, k, v, call, True)
    return f"B={batch} H={heads} L={length} D={dim}", calls


def host_time(repeats: int = 300) -> list[dict]:
    """Microseconds and torch operations per call with every kernel launch skipped (best of 7 runs of
    ``repeats`` calls; a tenth as many with a backward)."""
    from triton.runtime.jit import KernelInterface

    launch = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    try:
        rows = []
        for shape, calls in (_decoding_calls(), _masked_calls()):
            for name, (spec, q, k, v, call, backward) in calls.items():
                attn = ag.compile(spec)
                grad = torch.ones(*q.shape[:-1], v.shape[-1])

                def step():
                    if not backward:
                        with torch.no_grad():
                            return attn(q, k, v, **call)
                    out = attn(q, k, v, **call)
                    out.backward(grad)
                    q.grad = k.grad = v.grad = None

                step()  # builds and imports the module
                best = min(_per_call(step, max(1, repeats // (10 if backward else 1))) for _ in range(7))
                rows.append({"call": name, "shape": shape, "microseconds": best * 1e6,
                             "torch_ops": sum(dispatched(step).values())})
        return rows
    finally:
        KernelInterface.__getitem__ = launch


def threshold_passes(rows: int = 128, keys: int = 1024) -> list[dict]:
    """The Newton passes over the keys that the threshold family's forward takes on random q and k
    (scores of std 1 and 3), in its slowest program: the smallest ``iterations`` cap at which the
    output equals the uncapped one."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 16, generator=gen) for n in (rows, keys, keys))
    found = []
    for name, alpha in (("sparsemax", 2.0), ("1.5-entmax", 1.5)):
        for std in (1.0, 3.0):
            def output(cap):
                return ag.compile(ag.AttentionSpec(normalization=ag.norms.Entmax(alpha, iterations=cap)))(q * std, k, v)

            uncapped = output(64)
            passes = next(cap for cap in range(1, 65) if torch.equal(output(cap), uncapped))
            found.append({"normalization": name, "score_std": std, "rows": rows, "keys": keys, "passes": passes})
    return found


def markdown(results: dict) -> str:
    c = results["compile"]
    lines = ["## CPU proxies", "",
             f"Compile latency (ALiBi + causal): cold {c['cold_ms']:.0f} ms, from the disk cache in a new process "
             f"{c['cached_new_process_ms']:.1f} ms, again in the same process {c['same_process_ms']:.2f} ms.", "",
             "Tiles the forward kernel computes (64 x 64 tiles, one head):", "",
             "| mask | L | visited | full (no mask evaluated) | partial |", "|---|---|---|---|---|"]
    for r in results["tiles"]:
        lines.append(f"| {r['mask']} | {r['length']} | {r['visited']:.3f} ({r['total'] - r['empty']} / {r['total']}) "
                     f"| {r['full']} | {r['partial']} |")
    p = results["plan"]
    flex = p["flex_create_block_mask_ms"]
    flex = f"{flex:.0f} ms" if isinstance(flex, float) else flex
    lines += ["", f"Mask plan for a {p['length']}-token document mask ({p['documents']} documents, "
              f"{p['tile']} x {p['tile']} tiles): per-tile summaries (what each call computes) "
              f"{p['summaries_ms']:.2f} ms; classifying every tile on the host {p['classify_all_tiles_ms']:.1f} ms; "
              f"dense evaluation of the mask_mod with torch {p['dense_torch_ms']:.0f} ms "
              f"({p['dense_torch_ms'] / p['summaries_ms']:.0f}x the summaries, "
              f"{p['dense_torch_ms'] / p['classify_all_tiles_ms']:.0f}x the full classification); "
              f"FlexAttention create_block_mask {flex}.", "",
              "Interpreter time relative to the materialized reference (trend only):", "",
              "| variant | L | attngen ms | reference ms | ratio |", "|---|---|---|---|---|"]
    for r in results["interpreter"]:
        lines.append(f"| {r['variant']} | {r['length']} | {r['attngen_ms']:.1f} | {r['reference_ms']:.2f} | "
                     f"{r['ratio']:.0f} |")
    lines += ["", "Newton passes over the keys in the threshold family's forward (its slowest program; random q, k; "
              "besides the first pass, which finds each row's extent, and the last, which sums the output):", "",
              "| normalization | score std | rows x keys | passes |", "|---|---|---|---|"]
    for r in results["threshold"]:
        lines.append(f"| {r['normalization']} | {r['score_std']:g} | {r['rows']} x {r['keys']} | {r['passes']} |")
    lines += ["", "Host time per call, kernel launches skipped (best of 7 runs of back-to-back calls), and the torch "
              "operations a call dispatches:", "",
              "| call | shape | us per call | torch ops per call |", "|---|---|---|---|"]
    for r in results["host"]:
        lines.append(f"| {r['call']} | {r['shape']} | {r['microseconds']:.0f} | {r['torch_ops']} |")
    return "\n".join(lines) + "\n"


def run(quick: bool = False) -> dict:
    """Every proxy; ``quick`` uses small sizes (a smoke run)."""
    return {"compile": compile_latency(),
            "tiles": tiles_visited((1024,) if quick else (1024, 4096, 16384)),
            "plan": plan_building(2048 if quick else 32768),
            "interpreter": interpreter_ratio(32 if quick else 128),
            "threshold": threshold_passes(*((64, 256) if quick else (128, 1024))),
            "host": host_time(20 if quick else 300)}


def main() -> None:
    import argparse
    import datetime
    import platform
    from pathlib import Path

    import triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", type=Path, help="write proxies.md and proxies.json into this folder")
    args = parser.parse_args()
    results = run(args.quick)
    date = datetime.date.today().isoformat()
    header = (f"# attngen CPU proxies: {platform.machine()} CPU ({os.cpu_count()} cores), {date}\n\n"
              f"torch {torch.__version__}, triton {triton.__version__}, attngen {ag.__version__}\n\n")
    publish(header + markdown(results), results, args.out, "proxies")


def publish(text: str, data, out, stem: str) -> None:
    """Print the Markdown ``text``; with a folder ``out``, also write it and ``data`` there as
    ``<stem>.md`` and ``<stem>.json``."""
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
