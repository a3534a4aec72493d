"""The ``attngen`` command line: compile, show, export, check and time spec files.

A spec file is a Python file that defines an ``AttentionSpec`` (or a
``LinearAttentionSpec``) named ``SPEC`` (or the name given with ``--name``).
"""

from __future__ import annotations

import argparse
import dataclasses
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import reference
from .errors import SpecError
from .runtime import cache, plan
from .runtime.autotune import median_seconds
from .linear import LinearAttentionSpec, LinearState
from .runtime.compiled import CompiledAttention, compile as compile_spec
from .runtime.linear import CompiledLinearAttention
from .runtime.variants import CALLS
from .spec import AttentionSpec
from .testing.cases import Case
from .testing.linear_properties import gates


class UsageError(Exception):
    """A mistake on the command line; printed without a traceback."""


def load_spec(path: str, name: str) -> AttentionSpec | LinearAttentionSpec:
    """The spec called ``name`` defined by the Python file at ``path``."""
    if not Path(path).is_file():
        raise UsageError(f"spec file {path!r} does not exist")
    namespace = runpy.run_path(path)
    if name not in namespace:
        raise UsageError(f"{path} defines no {name!r}; define {name} = attngen.AttentionSpec(...) or pass --name")
    spec = namespace[name]
    if not isinstance(spec, (AttentionSpec, LinearAttentionSpec)):
        raise UsageError(f"{path}: {name} is a {type(spec).__name__}, not an attngen.AttentionSpec or "
                         "LinearAttentionSpec")
    return spec


def _compile(args) -> CompiledAttention | CompiledLinearAttention:
    return compile_spec(load_spec(args.spec_file, args.name))


def cmd_compile(args) -> int:
    attn = _compile(args)
    origin = "loaded from the cache" if attn.cache_hit else "generated"
    print(f"{args.spec_file}: {origin} in {attn.compile_seconds * 1e3:.1f} ms\n"
          f"  key    {attn.key}\n  module {attn.path}")
    return 0


def write_dot(graph, path: Path) -> None:
    """The IR graph in Graphviz's DOT language; PNG/SVG too when ``dot`` is installed."""
    lines = ["digraph attngen {", "  node [shape=box, fontname=monospace];"]
    for n in graph.order():
        label = graph.describe(n, lambda a: f"%{a}").replace('"', "'")
        lines.append(f'  n{n} [label="%{n}: {label}\\n{graph.dtype(n)}"];')
        lines += [f"  n{a} -> n{n};" for a in graph.args(n)]
    lines += [f'  out_{i} [label="{name}", shape=ellipse]; n{n} -> out_{i};'
              for i, (name, n) in enumerate(sorted(graph.outputs.items()))]
    dot = "\n".join(lines + ["}"]) + "\n"
    if path.suffix == ".dot":
        path.write_text(dot)
        return
    if shutil.which("dot") is None:
        raise UsageError(f"drawing {path.suffix} needs Graphviz's 'dot' program; write a .dot file instead")
    subprocess.run(["dot", f"-T{path.suffix[1:]}", "-o", str(path)], input=dot, text=True, check=True)


def _for_call(attn, args):
    """``attn`` compiled for the kind of call named ``args.call`` (a key of CALLS), with a block mask of
    ``args.block_mask`` blocks where given."""
    if args.call == "plain" and args.block_mask is None:
        return attn
    if isinstance(attn, CompiledLinearAttention):
        raise UsageError("linear attention has one kind of call: leave out --call and --block-mask")
    return attn.for_call(dataclasses.replace(CALLS[args.call], block_size=args.block_mask))


def block_size(text: str) -> tuple[int, int]:
    """``"B"`` or ``"BQxBK"`` (e.g. ``64x128``) as (block_q, block_k), positive integers."""
    parts = text.split("x")
    if len(parts) > 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected a block size B or BQxBK (positive integers), got {text!r}")
    return int(parts[0]), int(parts[-1])


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def device_name(text: str) -> str:
    """``cpu``, or ``cuda`` / ``cuda:N`` where torch sees that GPU."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():  # 0 without CUDA
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees {torch.cuda.device_count()} CUDA devices here")
    return text


def cmd_show(args) -> int:
    attn = _compile(args)
    linear = isinstance(attn, CompiledLinearAttention)
    if linear and (args.plan or args.blocks):
        raise UsageError("linear attention has no mask plan: it visits every chunk up to the diagonal")
    if (args.call != "plain" or args.block_mask) and (args.blocks or args.machine_code):
        raise UsageError("--blocks and --machine-code describe the plain call: leave out --call and --block-mask")
    attn = _for_call(attn, args)
    every = not (args.ir or args.source or args.plan)
    if every:
        print("# spec\n" + "\n".join(attn.description) + "\n")  # and the kind of call
    graph = attn.kernel_graph()
    if every or args.ir:
        what = "the feature map, with its derivative" if linear else "with gradients and the mask plan"
        print(f"# IR (optimized, {what})\n" + graph.text() + "\n")
    if (every and not linear) or args.plan:
        print("# mask plan\n" + "\n".join(plan.describe(graph)))
        if args.blocks:
            counts = attn.block_stats(args.blocks, args.blocks)
            print(f"tiles at Lq = Lk = {args.blocks} (batch 1, head 0, CPU tiles): {counts}")
        print()
    if every or args.source:
        print(f"# generated module ({attn.path})\n" + attn.source)
    if args.graph:
        write_dot(graph, Path(args.graph))
        print(f"IR graph written to {args.graph}", file=sys.stderr)
    if args.machine_code:
        print_machine_code(attn, args.machine_code)
    return 0


def head_dims(text: str) -> tuple[int, int]:
    """``"D"`` or ``"DQK/DV"`` (e.g. MLA's ``576/512``) as (q/k head dim, v head dim)."""
    parts = text.split("/")
    if len(parts) > 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected a head dim D or DQK/DV (positive integers), got {text!r}")
    return int(parts[0]), int(parts[-1])


def print_machine_code(attn, dims: tuple[int, int], heads: int = 8, length: int = 4096) -> None:
    """What each kernel of ``attn`` compiles to on sm_90 (bf16, head dims ``dims`` = (Dqk, Dv), untuned
    tiles), without a GPU."""
    from .testing.gpu_compile import compile_for_gpu

    qk_dim, v_dim = dims
    q, k = (torch.empty(1, heads, length, qk_dim, dtype=torch.bfloat16) for _ in range(2))
    v = torch.empty(1, heads, length, v_dim, dtype=torch.bfloat16)
    shown = qk_dim if qk_dim == v_dim else f"{qk_dim}/{v_dim}"
    print(f"# machine code (sm_90, bf16, {heads} heads x {length} x {shown}, untuned tiles; built, not run)")
    for kernel in compile_for_gpu(attn, q, k, v):
        hazard = "  <- spills or mma.sync" if kernel.spill_bytes or kernel.mma_sync else ""
        print(f"{kernel.phase:8}  {kernel.name:24}  {kernel.describe()}{hazard}")


def cmd_export(args) -> int:
    attn = _for_call(_compile(args), args)
    path = attn.export(args.output)
    entry = "forward(q, k, v, g=None)" if isinstance(attn, CompiledLinearAttention) else \
        f"forward(q, k, v, *captured{attn.entry_point.arguments()})"
    print(f"wrote {path}: import it with only torch and triton; {entry} is the entry point")
    return 0


def _dtypes(half: bool) -> tuple[torch.dtype, ...]:
    """The input dtypes a check or fuzz run draws: float32, and with ``half`` bf16 and fp16 too."""
    return (torch.float32, torch.bfloat16, torch.float16) if half else (torch.float32,)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def cmd_check(args) -> int:
    from .testing.check import check_spec, format_report

    spec = load_spec(args.spec_file, args.name)
    deep = args.deep
    examples = args.examples or (200 if deep else 20)
    dtypes = _dtypes(deep)
    max_len = args.max_len or (256 if deep else 96)
    print(f"attngen check {args.spec_file}: {examples} examples per property, {args.heads} query heads, "
          f"batch <= {args.batch}, lengths <= {max_len}, {_dtype_names(dtypes)}",
          flush=True)

    def progress(report):
        print(f"  {report.name}: {report.examples} examples in {report.seconds:.0f} s"
              f"{'' if report.ok else '  FAILED'}", file=sys.stderr, flush=True)
    reports = check_spec(spec, examples=examples, heads=args.heads, batch=args.batch, max_len=max_len,
                         dtypes=dtypes, seed=args.seed, properties=args.property, progress=progress)
    source = f"import runpy\nSPEC = runpy.run_path({str(Path(args.spec_file).resolve())!r})[{args.name!r}]"
    print(format_report(reports, source, linear=isinstance(spec, LinearAttentionSpec)))
    return 0 if all(r.ok for r in reports) else 1


def cmd_fuzz(args) -> int:
    from .testing.fuzz import fuzz

    examples = args.examples or (10_000 if args.deep else 100)
    dtypes = _dtypes(args.deep or args.half)
    max_len = args.max_len or (128 if args.deep else 48)
    print(f"attngen fuzz: {examples} random specs against the float64 reference (seed {args.seed}), lengths <= "
          f"{max_len}, {_dtype_names(dtypes)}", flush=True)
    started = time.perf_counter()

    def progress(report):
        print(f"  {report.examples} specs, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    def near_miss(report, miss):
        print(f"near miss at spec {report.examples} (every error within {slack:g}x its bound; goes on):")
        for line in miss.failure:
            print(f"  {line}")
        print("reproduce with:\n" + miss.reproduction, flush=True)
    slack = 1.0 if args.strict else 2.0
    report = fuzz(examples, seed=args.seed, max_len=max_len, progress=progress, near_miss=slack,
                  on_near_miss=near_miss, dtypes=dtypes)
    misses = f", {len(report.near_misses)} near misses (above)" if report.near_misses else ""
    if report.spec is None:
        print(f"{report.examples} specs match the reference{misses} ({time.perf_counter() - started:.0f} s)")
        return 0
    print(f"mismatch after {report.examples} specs{misses}; the smallest hypothesis found ({report.case.id}):")
    for line in [report.error] if report.error else report.failure:
        print(f"  {line}")
    print("reproduce with:\n" + report.reproduction())
    return 1


def _linear_contenders(attn: CompiledLinearAttention, case: Case, device: str) -> dict:
    """attngen's chunked kernels, the materialized reference and (causal) the recurrent torch form."""
    spec = attn.spec
    call = {"log_decay": gates(case).to(device)} if spec.decay == "gated" else {}
    found = {"attngen": lambda *t: attn(*t, **call),
             "reference (materialized)": lambda *t: reference.linear_attention(*t, spec, **call)}
    if spec.causal:
        zero = LinearState.zeros(case.batch, case.q_heads, case.qk_dim, case.v_dim, device)
        found["recurrent step (torch)"] = lambda *t: attn.step(*t, zero, **call)[0]
    return found


def cmd_bench(args) -> int:
    spec = load_spec(args.spec_file, args.name)
    attn = compile_spec(spec)
    batch, heads, length, dim = args.shape
    case = Case(batch, heads, heads, length, length, dim, dim)
    q, k, v = case.tensors(device=args.device)
    if isinstance(spec, LinearAttentionSpec):
        contenders = _linear_contenders(attn, case, args.device)
    else:
        contenders = {"attngen": attn, "reference (materialized)": lambda *t: reference.attention(*t, spec)}
        if spec.score_mod is None and spec.mask_mod is None:
            contenders["torch SDPA"] = torch.nn.functional.scaled_dot_product_attention
    print(f"shape B={batch} H={heads} L={length} D={dim} on {args.device}, median of {args.repeats}")
    print(f"{'implementation':<28}{'forward ms':>12}{'fwd+bwd ms':>12}")
    for label, fn in contenders.items():
        forward = median_seconds(lambda: fn(q, k, v), q.device, args.repeats)
        both = median_seconds(lambda: fn(q, k, v).sum().backward(), q.device, args.repeats)
        print(f"{label:<28}{forward * 1e3:>12.2f}{both * 1e3:>12.2f}")
    return 0


def cmd_cache(args) -> int:
    if args.action == "clear":
        print(f"removed {cache.clear()} cached modules from {cache.cache_dir()}")
        return 0
    modules = cache.entries()
    print(f"{cache.cache_dir()}: {len(modules)} cached modules")
    for path in modules:
        header = path.read_text().split("\n", 4)[:4]
        spec_line = next((line.strip() for line in header[3:] if line.strip()), "")
        print(f"  {path.stem[:16]}  {path.stat().st_size / 1024:6.1f} KiB  {spec_line}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``attngen`` command."""
    main = argparse.ArgumentParser(prog="attngen", description="Compile attention variants to Triton kernels.")
    commands = main.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, function, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(function=function)
        if name != "cache":
            sub.add_argument("spec_file", help="a Python file defining an AttentionSpec or a LinearAttentionSpec")
            sub.add_argument("--name", default="SPEC", help="the spec's variable name (default: SPEC)")
        return sub

    command("compile", cmd_compile, "build (or load from the cache) the kernels of a spec file")
    show = command("show", cmd_show, "print a spec, its optimized IR and its generated Triton module")
    show.add_argument("--ir", action="store_true", help="print only the IR")
    show.add_argument("--source", action="store_true", help="print only the generated module")
    show.add_argument("--plan", action="store_true", help="print only the mask plan (which tiles are visited)")
    show.add_argument("--blocks", type=positive_int, metavar="L",
                      help="also count empty/full/partial tiles at length L")
    show.add_argument("--call", choices=CALLS, default="plain",
                      help="the kernels of this kind of call: a KV cache (kv_lens, q_offset), decoding from one "
                           "(split-KV; sparsemax / entmax do not split), from a paged cache, packed sequences "
                           "(cu_seqlens) or dropout (default: plain)")
    show.add_argument("--block-mask", type=block_size, metavar="B", help="the kernels of such calls with a block mask "
                      "of blocks of B tokens (or BQxBK, e.g. 64x128)")
    show.add_argument("--graph", metavar="FILE", help="draw the IR graph to FILE (.dot; .png/.svg need Graphviz)")
    show.add_argument("--machine-code", type=head_dims, metavar="D", help="also build the kernels for Hopper (sm_90, "
                      "bf16, head dim D, or DQK/DV such as 576/512; no GPU needed) and print registers, spills, "
                      "shared memory and MMA instructions")
    export = command("export", cmd_export, "write a standalone kernel file that needs only torch and triton")
    export.add_argument("-o", "--output", required=True, help="the .py file to write")
    export.add_argument("--call", choices=CALLS, default="plain",
                        help="the kernels of this kind of call: plain, on a KV cache (forward takes kv_lens and "
                             "q_offset), decoding from one (the same, split-KV) or from a paged one (block_table "
                             "too; forward only), on packed sequences (cu_seqlens_q and cu_seqlens_k) or with "
                             "dropout (dropout_p and seed) (default: plain)")
    export.add_argument("--block-mask", type=block_size, metavar="B",
                        help="the kernels of such calls with a block mask of blocks of B tokens (or BQxBK, e.g. "
                             "64x128): forward takes block_mask")
    check = command("check", cmd_check, "property-test a spec: the float64 reference and invariants, on random "
                                        "shapes; prints a runnable snippet for the smallest failing case")
    check.add_argument("--examples", type=positive_int, help="shapes per property (default 20, --deep 200)")
    check.add_argument("--deep", action="store_true", help="more examples, lengths up to 256, bf16 and fp16 too")
    check.add_argument("--heads", type=positive_int, default=8,
                       help="query heads, as the spec's captured tensors expect (default 8)")
    check.add_argument("--batch", type=positive_int, default=2, help="largest batch (default 2)")
    check.add_argument("--max-len", type=positive_int, help="longest Lq / Lk (default 96, --deep 256)")
    check.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0: the same run every time)")
    check.add_argument("--property", nargs="*", help="run only these properties (names as in the report)")
    fuzz = commands.add_parser("fuzz", help="check random specs from a grammar against the reference",
                               description="compile random score_mods and mask_mods (from a small grammar) with "
                                           "random normalizations and statistics (or as differential attention), "
                                           "call each on its inputs, on a KV cache (paged or not), as packed sequences "
                                           "or with a block mask, with or without dropout, "
                                           "and compare it with the float64 reference; stops at the first "
                                           "mismatch and prints it as a snippet. A spec whose errors all stay "
                                           "within twice their bounds (float32 rounding of ill-conditioned "
                                           "specs) is printed as a near miss and the run goes on")
    fuzz.set_defaults(function=cmd_fuzz)
    fuzz.add_argument("--examples", type=positive_int, help="random specs (default 100, --deep 10000)")
    fuzz.add_argument("--deep", action="store_true", help="10,000 specs, lengths up to 128, bf16 and fp16 too "
                                                          "(hours on a CPU: run it in the background)")
    fuzz.add_argument("--half", action="store_true", help="bf16 and fp16 inputs too")
    fuzz.add_argument("--max-len", type=positive_int, help="longest Lq / Lk (default 48, --deep 128)")
    fuzz.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    fuzz.add_argument("--strict", action="store_true", help="stop at near misses too")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    bench = command("bench", cmd_bench, "time a spec against the reference and SDPA")
    bench.add_argument("--device", type=device_name, default=default_device,
                       help=f"cpu, cuda or cuda:N (default: {default_device})")
    bench.add_argument("--shape", type=positive_int, nargs=4, metavar=("B", "H", "L", "D"), default=(1, 8, 128, 64),
                       help="batch, heads, sequence length, head dim (default 1 8 128 64)")
    bench.add_argument("--repeats", type=positive_int, default=3, help="timed runs (default 3)")
    cache_parser = command("cache", cmd_cache, "list or clear the cache of generated modules")
    cache_parser.add_argument("action", choices=("ls", "clear"))
    return main


def main(argv: list[str] | None = None) -> int:
    arguments = parser()
    args = arguments.parse_args(argv)
    if args.command is None:
        arguments.print_help()
        return 0
    try:
        return args.function(args)
    except (UsageError, SpecError, ValueError, TypeError) as error:
        print(f"attngen {args.command}: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file that cannot be written or read: -o in a missing folder, the cache
        where = f"{error.filename}: " if error.filename else ""
        print(f"attngen {args.command}: {where}{error.strerror or error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
