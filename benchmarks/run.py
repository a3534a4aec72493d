"""Benchmark harness: attngen vs FlexAttention (under torch.compile) vs SDPA.

For each variant x shape x dtype, every implementation that can express the
variant runs forward and forward+backward on the same inputs, one after the
other in one process. Outputs are checked against each other before timing.
Times are medians of CUDA-event (or wall-clock on CPU) measurements after
warm-up; TFLOP/s use the standard convention (4 B H Lq Lk D forward, 2 B H Lq Lk (Dqk + Dv) where
the head dims differ, times the
fraction of kept scores, x2.5 for backward; for linear attention, the recurrent
form's work 4 B H L D^2). A decoding sweep (one new token
against a KV cache, GQA 8:1, B 1..64, Lk 1k..128k) reports the cache read
bandwidth. Results go to ``benchmarks/results/<device>-<date>/``: results.json
(raw), results.md (tables) and one PNG per variant when matplotlib is installed.

    python benchmarks/run.py              # the full GPU sweep
    python benchmarks/run.py --smoke      # tiny shapes, any device (CPU: Triton's interpreter)
    python benchmarks/run.py --proxies    # also the CPU proxies of benchmarks/proxies.py
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import runpy
import time
from pathlib import Path

import torch
import triton

import attngen as ag
from attngen.cli import head_dims
from attngen.runtime import autotune
import proxies as cpu_proxies  # benchmarks/proxies.py

T5_BUCKET = runpy.run_path(str(Path(__file__).parent.parent / "specs" / "t5_relative_bias.py"))["t5_bucket"]

try:
    from torch.nn.attention import flex_attention as flex
except ImportError:  # older torch
    flex = None


def block_sparse(heads: int, length: int, device: str):
    """A FlexAttention BlockMask of whole blocks (128 x 128; 16 x 16 for short smoke lengths), per
    head: each query block keeps its diagonal block and about a quarter of the earlier ones (block
    selection as in NSA or Quest), and the fraction of scores it keeps."""
    block = 128 if length >= 512 else 16
    n = -(-length // block)
    gen = torch.Generator(device=device).manual_seed(0)
    eye = torch.eye(n, dtype=torch.bool, device=device)
    keep = ((torch.rand(heads, n, n, generator=gen, device=device) < 0.25) | eye) & eye.cumsum(0).bool()
    counts = keep.sum(-1, dtype=torch.int32)[None]  # [1, H, n]: the same for every batch entry
    indices = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None]  # kept first
    mask = flex.BlockMask.from_kv_blocks(torch.zeros_like(counts), indices, counts, indices, BLOCK_SIZE=block,
                                         seq_lengths=(length, length))
    return mask, float(keep.sum()) / keep.numel()


def variants(batch: int, heads: int, length: int, dim: int, device: str) -> dict:
    """name -> (attngen spec, flex (score_mod, mask_mod or BlockMask) or None, SDPA kwargs or None, kept
    fraction). The sliding window is causal with 1024 keys (a quarter of the length below 4096); a
    BlockMask goes to attngen too, as ``block_mask=``."""
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], device=device)
    docs = torch.arange(length, device=device) * 4 // length  # four equal documents
    doc_ids = docs.expand(batch, length)  # [B, L]: both mask_mods read doc_ids[b, .] for every b
    window = min(1024, length // 4)
    prefix = length // 4

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    t5_table = torch.randn(heads, 32, device=device)

    def t5_bias(score, b, h, q_idx, kv_idx):  # T5's decoder buckets, written with torch's conversions
        return score + t5_table[h, T5_BUCKET(kv_idx - q_idx, bidirectional=False)]

    causal = ag.masks.causal
    sliding = ag.masks.causal & ag.masks.sliding_window(window)
    document = ag.masks.document(doc_ids)
    prefix_lm = ag.masks.prefix_lm(prefix)
    half = 0.5 + 0.5 / length
    alphas = torch.linspace(1.2, 2.0, heads, device=device).requires_grad_()  # entmax_per_head's, learnable
    linear_work = dim / length  # linear attention: per token 2 D^2 to update the state, 2 D^2 to read it
    blocks, blocks_kept = block_sparse(heads, length, device) if flex is not None else (None, 0.0)
    return {
        "plain": (ag.AttentionSpec(), (None, None), {}, 1.0),
        "causal": (ag.AttentionSpec(mask_mod=causal), (None, causal), {"is_causal": True}, half),
        "sliding_window": (ag.AttentionSpec(mask_mod=sliding), (None, sliding), None,
                           min(1.0, (window + 1) / length)),
        "alibi": (ag.AttentionSpec(score_mod=alibi, mask_mod=causal), (alibi, causal), None, half),
        "softcap": (ag.AttentionSpec(score_mod=softcap), (softcap, None), None, 1.0),
        "t5_bias": (ag.AttentionSpec(score_mod=t5_bias, mask_mod=causal), (t5_bias, causal), None, half),
        "document": (ag.AttentionSpec(mask_mod=document), (None, document), None, 0.25),
        "prefix_lm": (ag.AttentionSpec(mask_mod=prefix_lm), (None, prefix_lm), None, half + prefix / length / 4),
        **({"block_sparse": (ag.AttentionSpec(), (None, blocks), None, blocks_kept)} if blocks is not None else {}),
        "sigmoid": (ag.AttentionSpec(normalization=ag.norms.Sigmoid(bias="-log n")), None, None, 1.0),
        "softmax_sink": (ag.AttentionSpec(normalization=ag.norms.Softmax(sink=torch.zeros(heads, device=device))),
                         None, None, 1.0),
        "off_by_one": (ag.AttentionSpec(normalization=ag.norms.OffByOne()), None, None, 1.0),
        "relu2": (ag.AttentionSpec(normalization=ag.norms.ReLU(power=2)), None, None, 1.0),
        "scalable_softmax": (ag.AttentionSpec(normalization=ag.norms.ScalableSoftmax(s=0.4)), None, None, 1.0),
        "affine_softmax": (ag.AttentionSpec(normalization=ag.norms.AffineSoftmax(alpha=0.9, beta=0.01)),
                           None, None, 1.0),
        "elementwise_sigmoid2": (ag.AttentionSpec(normalization=ag.norms.Elementwise(lambda s: torch.sigmoid(s) ** 2)),
                                 None, None, 1.0),
        "softpick": (ag.AttentionSpec(normalization=ag.norms.Softpick()), None, None, 1.0),
        "signed_softmax": (ag.AttentionSpec(normalization=ag.norms.SignedSoftmax()), None, None, 1.0),
        "polynomial": (ag.AttentionSpec(normalization=ag.norms.Normalized(lambda s: s ** 4)), None, None, 1.0),
        "entropy_stat": (ag.AttentionSpec(mask_mod=causal, stats=("entropy",)), None, None, half),
        "sparsemax": (ag.AttentionSpec(normalization=ag.norms.Sparsemax(), mask_mod=causal), None, None, half),
        "entmax15": (ag.AttentionSpec(normalization=ag.norms.Entmax(1.5), mask_mod=causal), None, None, half),
        "entmax_per_head": (ag.AttentionSpec(normalization=ag.norms.Entmax(alphas), mask_mod=causal), None, None, half),
        "stick_breaking": (ag.AttentionSpec(normalization=ag.norms.StickBreaking(), mask_mod=causal), None, None,
                           half),
        "differential": (ag.AttentionSpec(differential=0.5, mask_mod=causal), None, None, half),
        "linear_elu": (ag.LinearAttentionSpec(), None, None, linear_work),
        "retention": (ag.LinearAttentionSpec(feature_map="identity", decay=0.97, normalize=False), None, None,
                      linear_work),
    }


def shapes(args, device: str) -> list[tuple[int, int, int, int, int]]:
    """(batch, heads, length, qk head dim, v head dim): B * L = 16k tokens on GPUs, restricted to
    ``--lengths`` / ``--dims``; the smoke run's dims are those of ``--dims`` when given."""
    if args.smoke:
        (qk_dim, v_dim), *_ = args.dims or [(32, 32) if device == "cpu" else (64, 64)]
        return [(1, 2, 64, qk_dim, v_dim)] if device == "cpu" else [(2, 16, 512, qk_dim, v_dim)]
    return [(16384 // length, 16, length, qk_dim, v_dim) for qk_dim, v_dim in args.dims or ((64, 64), (128, 128))
            for length in args.lengths or (512, 1024, 2048, 4096, 8192, 16384)]


def out_of_time(args) -> bool:
    """Whether ``--budget`` seconds have passed since the run started (then no new measurement starts)."""
    spent = time.perf_counter() - args.started
    if args.budget is not None and spent > args.budget:
        if not args.stopped:
            print(f"budget of {args.budget:.0f} s spent: writing what was measured", flush=True)
        args.stopped = True
    return args.stopped


def median_ms(run, device: str, repeats: int, calls: int = 5) -> float:
    """Milliseconds per call: the median over ``repeats`` timings, each of ``calls`` back-to-back calls
    between two CUDA events (wall clock on CPU), after a warm-up call. Back to back, as in training
    and as triton.testing.do_bench times, the host runs ahead of the GPU, so a call's host work is
    hidden behind the kernels before it, unless it takes longer than they do. (The 2026-11-28 H200
    tables synchronized after every call instead, so each time there includes the call's host work.)"""
    run()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / calls)
        else:
            started = time.perf_counter()
            run()
            times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[len(times) // 2]


def compiled_flex():
    """FlexAttention under torch.compile, compiled afresh: every variant and shape calls the same
    function, and past Dynamo's recompile limit (8) a call would silently fall back to eager mode.
    Compiled graphs still come from Inductor's on-disk caches when a warm-up run made them."""
    torch._dynamo.reset()
    return torch.compile(flex.flex_attention)


def sdpa_backends(device: str) -> dict:
    """name -> SDPA backend: on CUDA flash (FlashAttention-2) and cuDNN, each forced; on CPU the default."""
    if device != "cuda":
        return {"sdpa": None}
    backends = torch.nn.attention.SDPBackend
    return {"sdpa (flash)": backends.FLASH_ATTENTION, "sdpa (cudnn)": backends.CUDNN_ATTENTION}


def sdpa(backend, **kwargs):
    """callable(q, k, v) running SDPA with ``backend`` (None: the default choice)."""
    def run(q, k, v):
        if backend is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
        with torch.nn.attention.sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    return run


def graphed(run, device: str):
    """A callable replaying ``run`` captured in a CUDA graph (as serving loops run decoding: no
    host work per step), or None on CPU or where capture fails."""
    if device != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs asks
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        return graph.replay
    except Exception as error:  # a graph that cannot be captured is a result too
        print(f"no CUDA graph: {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)
        return None


def implementations(spec, flex_mods, sdpa_kwargs, shape, device):
    """name -> callable(q, k, v) for everything that can express the variant."""
    batch, heads, length = shape[:3]
    found = {"attngen": ag.compile(spec)}
    if flex is not None and flex_mods is not None:
        score_mod, mask_mod = flex_mods
        if isinstance(mask_mod, flex.BlockMask):  # a block-sparse pattern of its own: both take it
            block_mask = mask_mod
            found["attngen"] = functools.partial(found["attngen"], block_mask=block_mask)
        else:
            block_mask = None if mask_mod is None else flex.create_block_mask(mask_mod, None, None, length, length,
                                                                              device=device)
        compiled = compiled_flex()
        found["flex (compiled)"] = lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)
    if sdpa_kwargs is not None:
        found.update({name: sdpa(backend, **sdpa_kwargs) for name, backend in sdpa_backends(device).items()})
    return found


def decode_shapes(smoke: bool, device: str) -> list[tuple[int, int, int, int, int, int]]:
    """(batch, query heads, kv heads, cache length, qk head dim, v head dim) of the decoding sweep, one new
    token, B x Lk at most 1M cached tokens: GQA 8:1 at head dim 128, then MLA's absorbed form (128 query
    heads over one latent kv head, Dqk 576, Dv 512, the values the keys' first 512 dims)."""
    if smoke:
        return [(2, 8, 1, 96, 32, 32), (1, 8, 1, 40, 576, 512)] if device == "cpu" else \
            [(4, 32, 4, 4096, 128, 128), (8, 128, 1, 4096, 576, 512)]
    return [(batch, 32, 4, length, 128, 128) for batch in (1, 8, 64) for length in (1024, 8192, 32768, 131072)
            if batch * length <= 1 << 20] + \
        [(batch, 128, 1, length, 576, 512) for batch in (8, 64) for length in (4096, 16384)]


DECODE_VARIANTS = {  # timed like attngen's softmax, with no other implementation to compare against
    "attngen differential": ag.AttentionSpec(differential=0.5, mask_mod=ag.masks.causal),
    "attngen stick-breaking": ag.AttentionSpec(normalization=ag.norms.StickBreaking(), mask_mod=ag.masks.causal),
    "attngen sigmoid": ag.AttentionSpec(normalization=ag.norms.Sigmoid(bias="-log n"), mask_mod=ag.masks.causal),
}


def key_block_selection(device: str) -> ag.AttentionSpec:
    """Causal decoding over about a quarter of each sequence's 64-key blocks (the same for every head,
    as a Quest-style selection shared by a GQA group would be): one table for every decode shape, so
    one compiled module. Its split-KV programs pack the query heads of a kv head and walk tile lists."""
    gen = torch.Generator(device=device).manual_seed(0)
    chosen = torch.rand(64, 1 << 11, generator=gen, device=device) < 0.25  # batch <= 64, <= 128k keys
    return ag.AttentionSpec(mask_mod=lambda b, h, q_idx, kv_idx: chosen[b, kv_idx // 64] & (kv_idx <= q_idx))


def measure_decode(args) -> list[dict]:
    """One new token per sequence against a full cache: attngen (split-KV on CUDA), compiled
    FlexAttention and SDPA, all with GQA, then (but for MLA's shapes) attngen's other normalizations
    (DECODE_VARIANTS) and a key-block selection; reports the cache read bandwidth as well (of the whole
    cache: for the selection, which reads a quarter of it, an effective figure)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows = []
    others = {impl: ag.compile(spec) for impl, spec in DECODE_VARIANTS.items()}
    others["attngen 1/4 of the key blocks"] = ag.compile(key_block_selection(device))
    for batch, heads, kv_heads, length, qk_dim, v_dim in decode_shapes(args.smoke, device):
        if out_of_time(args):
            break
        gen = torch.Generator(device=device).manual_seed(0)
        latent = v_dim != qk_dim  # MLA: the values are a view of the keys' latent part
        q = torch.randn(batch, heads, 1, qk_dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(batch, kv_heads, length, qk_dim, device=device, dtype=dtype, generator=gen)
        v = k[..., :v_dim] if latent else torch.randn(k.shape, device=device, dtype=dtype, generator=gen)
        lens = torch.full((batch,), length, device=device, dtype=torch.int32)
        attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal))
        runs = {"attngen": lambda: attn(q, k, v, kv_lens=lens),
                "sdpa": functools.partial(sdpa(None, enable_gqa=True), q, k, v)}
        if flex is not None:
            compiled = compiled_flex()
            runs["flex (compiled)"] = lambda: compiled(q, k, v, enable_gqa=True)
        reference = runs["attngen"]().float()
        compared = set(runs)
        if not latent:
            runs.update({impl: functools.partial(other, q, k, v, kv_lens=lens) for impl, other in others.items()})
        cache_bytes = batch * kv_heads * length * (qk_dim + (0 if latent else v_dim)) * q.element_size()
        for impl, run in runs.items():
            row = {"variant": "decode", "impl": impl, "batch": batch, "heads": f"{heads}:{kv_heads}",
                   "length": length, "head_dim": qk_dim if qk_dim == v_dim else f"{qk_dim}/{v_dim}",
                   "dtype": str(dtype).replace("torch.", "")}
            try:
                if impl in compared:
                    row["max_diff_vs_attngen"] = float((run().float() - reference).abs().max())
                row["forward_ms"] = median_ms(run, device, args.repeats)
                replay = graphed(run, device)
                if replay is not None:
                    row["graph_ms"] = median_ms(replay, device, args.repeats)
                row["cache_gb_per_s"] = cache_bytes / row.get("graph_ms", row["forward_ms"]) / 1e6
            except Exception as error:  # a failing baseline is a result too
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def measure(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32] if device == "cpu" else [getattr(torch, name) for name in args.dtypes]
    rows = []
    for shape in shapes(args, device):
        batch, heads, length, qk_dim, v_dim = shape
        for name, (spec, flex_mods, sdpa_kwargs, kept) in variants(batch, heads, length, qk_dim, device).items():
            if args.only and name not in args.only:
                continue
            for dtype in dtypes:
                if out_of_time(args):
                    return rows
                gen = torch.Generator(device=device).manual_seed(0)
                q, k, v = (torch.randn(batch, heads, length, dim, device=device, dtype=dtype, generator=gen)
                           .requires_grad_() for dim in (qk_dim, qk_dim, v_dim))
                grad = torch.randn(batch, heads, length, v_dim, device=device, dtype=dtype, generator=gen)
                runs = implementations(spec, flex_mods, sdpa_kwargs, shape, device)
                reference = runs["attngen"](q, k, v).detach()
                flops = 2 * batch * heads * length * length * (qk_dim + v_dim) * kept  # QK^T and PV
                for impl, fn in runs.items():
                    row = {"variant": name, "impl": impl, "batch": batch, "heads": heads, "length": length,
                           "head_dim": qk_dim if qk_dim == v_dim else f"{qk_dim}/{v_dim}",
                           "dtype": str(dtype).replace("torch.", "")}
                    try:
                        out = fn(q, k, v)
                        row["max_diff_vs_attngen"] = float((out.detach().float() - reference.float()).abs().max())
                        row["forward_ms"] = median_ms(lambda: fn(q, k, v), device, args.repeats)
                        row["forward_backward_ms"] = median_ms(lambda: fn(q, k, v).backward(grad), device, args.repeats)
                        row["forward_tflops"] = flops / row["forward_ms"] / 1e9
                        row["forward_backward_tflops"] = 3.5 * flops / row["forward_backward_ms"] / 1e9
                    except Exception as error:  # a failing baseline is a result too (e.g. out of resources)
                        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


# each non-softmax normalization against attngen's softmax with the same mask (target: >= 0.9)
SOFTMAX_BASELINE = {**dict.fromkeys(["sigmoid", "softmax_sink", "off_by_one", "relu2", "scalable_softmax",
                                     "affine_softmax", "elementwise_sigmoid2", "softpick", "signed_softmax",
                                     "polynomial"], "plain"),
                    **dict.fromkeys(["sparsemax", "entmax15", "entmax_per_head", "stick_breaking"], "causal")}
METRICS = ("forward_ms", "forward_backward_ms")


def ratios(rows: list[dict]) -> None:
    """Add speed ratios (higher is better): on each other implementation's row, attngen's speedup
    over it (its time / attngen's); on attngen's row of a non-softmax normalization, its speed
    relative to attngen's softmax on the same shape."""
    key = lambda r: (r["variant"], r["length"], r["head_dim"], r["dtype"])  # noqa: E731
    groups: dict = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    ours = {k: next((r for r in group if r["impl"] == "attngen" and "error" not in r), None)
            for k, group in groups.items()}
    for k, group in groups.items():
        for other in (r for r in group if r["impl"] != "attngen" and "error" not in r and ours[k]):
            for metric in METRICS:
                other[f"{metric}_attngen_speedup"] = other[metric] / ours[k][metric]
        softmax = ours.get((SOFTMAX_BASELINE.get(k[0]), *k[1:]))
        if ours[k] and softmax:
            for metric in METRICS:
                ours[k][f"{metric}_vs_own_softmax"] = softmax[metric] / ours[k][metric]


TARGETS = (  # issue 9: (what, rows it covers, ratio key, goal)
    ("fwd vs FlexAttention", lambda r: r["impl"] == "flex (compiled)", "forward_ms_attngen_speedup", 1.1),
    ("fwd+bwd vs FlexAttention", lambda r: r["impl"] == "flex (compiled)", "forward_backward_ms_attngen_speedup",
     1.05),
    ("causal fwd vs SDPA flash", lambda r: r["impl"] == "sdpa (flash)" and r["variant"] == "causal",
     "forward_ms_attngen_speedup", 0.95),
    ("causal fwd+bwd vs SDPA flash", lambda r: r["impl"] == "sdpa (flash)" and r["variant"] == "causal",
     "forward_backward_ms_attngen_speedup", 0.95),
    ("non-softmax fwd vs own softmax", lambda r: r["impl"] == "attngen", "forward_ms_vs_own_softmax", 0.9),
    ("non-softmax fwd+bwd vs own softmax", lambda r: r["impl"] == "attngen", "forward_backward_ms_vs_own_softmax",
     0.9),
)


def targets(rows: list[dict]) -> list[str]:
    """Markdown lines: for each speed target, the worst measured ratio (and where), and how many rows met
    the goal; then attngen's failures at head dim 128 (the target is none)."""
    lines = ["## Targets", "", "| target | goal | worst ratio | at | rows meeting it |", "|---|---|---|---|---|"]
    for what, covers, ratio, goal in TARGETS:
        measured = [r for r in rows if covers(r) and ratio in r]
        if not measured:
            lines.append(f"| {what} | >= {goal} | not measured | | |")
            continue
        worst = min(measured, key=lambda r: r[ratio])
        lines.append(f"| {what} | >= {goal} | {worst[ratio]:.2f} | {worst['variant']} L{worst['length']} "
                     f"D{worst['head_dim']} {worst['dtype']} | {sum(r[ratio] >= goal for r in measured)} of "
                     f"{len(measured)} |")
    failed = [f"{r['variant']} L{r['length']} {r['dtype']}" for r in rows
              if r["impl"] == "attngen" and r["head_dim"] == 128 and "error" in r]
    tried = sum(r["impl"] == "attngen" and r["head_dim"] == 128 for r in rows)
    lines.append(f"| attngen failures at head dim 128 | none | {len(failed)} of {tried} | {', '.join(failed)} | |")
    return lines


def tuning(args) -> str:
    """How attngen's launch configs were chosen in this run, in words."""
    mode = os.environ.get("ATTNGEN_AUTOTUNE", "1")
    if mode == "0" or not (torch.cuda.is_available() or mode == "cpu"):
        return "untuned (default launch configs)"
    return f"autotuned over {len(args.candidates)} candidate configs" if args.candidates else "autotuned"


def write(rows: list[dict], args, proxies: dict | None = None, decode_rows: list[dict] = ()) -> Path:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    date = datetime.date.today().isoformat()
    folder = args.out / f"{device.replace(' ', '_')}-{date}{'-smoke' if args.smoke else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "date": date, "torch": torch.__version__, "triton": triton.__version__,
            "attngen": ag.__version__, "smoke": args.smoke, "tuning": tuning(args),
            "stopped_at_budget": args.stopped}
    (folder / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "decode": list(decode_rows)},
                                                    indent=1))
    lines = [f"# attngen benchmarks: {device}, {date}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, attngen {meta['attngen']}; attngen {meta['tuning']}"
             f"{' (smoke run: tiny shapes, not a measurement)' if args.smoke else ''}"
             f"{f' (stopped after the {args.budget:.0f} s budget: not every shape ran)' if args.stopped else ''}", "",
             "Speedup: attngen's over the row's implementation (its time / attngen's; above 1, attngen is "
             "faster). vs own softmax: attngen's row against attngen's softmax with the same mask.", "",
             "| variant | impl | B | H | L | D | dtype | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
             "| attngen speedup fwd / fwd+bwd | vs own softmax fwd / fwd+bwd | max diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['impl']} | {r['batch']} | {r['heads']} | {r['length']} | "
                         f"{r['head_dim']} | {r['dtype']} | error: {r['error']} | | | | | | |")
            continue
        speedup, own = (f"{r[f'forward_ms_{name}']:.2f} / {r[f'forward_backward_ms_{name}']:.2f}"
                        if f"forward_ms_{name}" in r else "" for name in ("attngen_speedup", "vs_own_softmax"))
        lines.append(f"| {r['variant']} | {r['impl']} | {r['batch']} | {r['heads']} | {r['length']} | "
                     f"{r['head_dim']} | {r['dtype']} | {r['forward_ms']:.3f} | {r['forward_tflops']:.1f} | "
                     f"{r['forward_backward_ms']:.3f} | {r['forward_backward_tflops']:.1f} | {speedup} | {own} | "
                     f"{r['max_diff_vs_attngen']:.1e} |")
    lines += [""] + targets(rows)
    if decode_rows:
        lines += ["", "## Decoding (one new token, full cache, GQA; MLA's absorbed 576 / 512 over one kv head)", "",
                  "eager: a plain call per step; graph: replays of one CUDA graph capture (no host work per step). "
                  "Cache GB/s from the graph time where there is one.", "",
                  "| impl | B | Hq:Hkv | Lk | D | dtype | eager ms | graph ms | cache GB/s | max diff |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in decode_rows:
            diff = f"{r['max_diff_vs_attngen']:.1e}" if "max_diff_vs_attngen" in r else ""
            graph = f"{r['graph_ms']:.3f}" if "graph_ms" in r else ""
            cells = f"error: {r['error']} | | | |" if "error" in r else \
                f"{r['forward_ms']:.3f} | {graph} | {r['cache_gb_per_s']:.0f} | {diff} |"
            lines.append(f"| {r['impl']} | {r['batch']} | {r['heads']} | {r['length']} | {r['head_dim']} | "
                         f"{r['dtype']} | {cells}")
    if proxies is not None:
        lines += ["", cpu_proxies.markdown(proxies)]
        (folder / "proxies.json").write_text(json.dumps(proxies, indent=1))
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, folder)
    return folder


def plot(rows: list[dict], folder: Path) -> None:
    """One PNG per variant (forward+backward TFLOP/s against length), if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots")
        return
    for variant in sorted({r["variant"] for r in rows}):
        figure, axis = plt.subplots(figsize=(6, 4))
        series: dict = {}
        for r in rows:
            if r["variant"] == variant and "error" not in r:
                series.setdefault(f"{r['impl']} D{r['head_dim']} {r['dtype']}", []).append(
                    (r["length"], r["forward_backward_tflops"]))
        for label, points in sorted(series.items()):
            axis.plot(*zip(*sorted(points)), marker="o", label=label)
        axis.set(xscale="log", xlabel="sequence length", ylabel="fwd+bwd TFLOP/s", title=variant)
        axis.legend(fontsize=6)
        figure.tight_layout()
        figure.savefig(folder / f"{variant}.png", dpi=120)
        plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the harness, measures nothing")
    parser.add_argument("--only", nargs="*", help="variant names to run")
    parser.add_argument("--lengths", type=int, nargs="*", help="sequence lengths (default 512 .. 16384)")
    parser.add_argument("--dims", type=head_dims, nargs="*",
                        help="head dims, D or DQK/DV (default 64 128; MLA's training form: 192/128)")
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16", "float16"], choices=["bfloat16", "float16"],
                        help="GPU dtypes (CPU runs float32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: start no new measurement after this, write what was measured")
    parser.add_argument("--candidates", type=json.loads, metavar="JSON",
                        help="autotune attngen over these tile configs (a JSON list of {BLOCK_M, BLOCK_N, num_warps, "
                             "num_stages}) instead of its full list, even where ATTNGEN_AUTOTUNE=0")
    parser.add_argument("--proxies", action="store_true",
                        help="also measure the CPU proxies (compile latency, tiles visited, mask-plan building)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for the <device>-<date> result folder (default: benchmarks/results)")
    args = parser.parse_args()
    args.started, args.stopped = time.perf_counter(), False
    unknown = set(args.only or ()) - set(variants(1, 1, 64, 32, "cpu")) - {"decode"}
    if unknown:
        parser.error(f"--only: unknown variant(s) {', '.join(sorted(unknown))}; "
                     f"known: {', '.join(variants(1, 1, 64, 32, 'cpu'))}, decode")
    if args.candidates:
        os.environ["ATTNGEN_AUTOTUNE"] = "1"
        autotune.GPU_CANDIDATES[:] = args.candidates
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 20
    rows = measure(args)
    ratios(rows)
    decode_rows = measure_decode(args) if not args.only or "decode" in args.only else []
    proxies = cpu_proxies.run(quick=args.smoke) if args.proxies else None
    if proxies is not None:
        print(cpu_proxies.markdown(proxies))
    print(f"results in {write(rows, args, proxies, decode_rows)}")


if __name__ == "__main__":
    main()
