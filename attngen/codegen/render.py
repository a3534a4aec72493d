"""Render the kernel module of a spec from the jinja2 templates."""

from __future__ import annotations

import hashlib
import inspect
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable

import jinja2

from .. import __version__, index_checks
from ..blocks import (block_matrix, dense_block_size, describe_value, flex_block_mask, flex_blocks, flex_mask_mod,
                      scatter_blocks)
from ..head_dims import qk_parts
from ..ir.graph import Graph
from ..ir.passes.ranges import SEGMENTS
from ..norms import ONLINE_FAMILIES, WEIGHT_FAMILIES, Normalization
from ..qkv import (GRID_AXIS_LIMIT, KERNEL_DTYPES, LINEAR_MAX_HEAD_DIM, MAX_HEAD_DIM, cache_positions, check_device,
                   check_entmax_alpha, check_launch, check_pages_in_range, check_qkv, dropout_rate, dropout_tensors,
                   jagged_at_length, jagged_view, kept_extremes, least_and_greatest, packed_output, packed_positions,
                   packed_view, paged_view, per_batch_integers, per_head_tensor, tensor_kind, under_autocast,
                   values_checkable)
from ..runtime.plan import depends_on_head, layout, same_for_all_heads
from ..stats import MapStat, forward_only
from .printer import TritonPrinter
from .prune import without_unused_functions

TEMPLATE = "attention.py.j2"
LINEAR_TEMPLATE = "linear.py.j2"
TEMPLATE_VERSION = 1


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The jinja2 environment over the templates shipped with attngen."""
    loader = jinja2.FunctionLoader(lambda name: (resources.files("attngen") / "templates" / name).read_text())
    return jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True)


@lru_cache(maxsize=1)
def compiler_digest() -> str:
    """A hash of the template and of attngen's own sources: part of every cache key,
    so an upgraded (or edited) compiler never reuses modules an older one generated."""
    root = Path(str(resources.files("attngen")))
    digest = hashlib.sha256()
    for path in sorted((root / "templates").glob("*.j2")) + sorted(root.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def docstring_lines(spec_lines: list[str]) -> list[str]:
    """The spec's description as it goes into the module docstring: escaped where it would end it early."""
    return [line.replace("\\", "\\\\").replace('"""', '\\"\\"\\"') for line in spec_lines]


def _axes_name(axes: frozenset) -> str:
    return "both" if len(axes) == 2 else "".join(axes)


def _unpack(names: list[str]) -> str:
    """The left-hand side that unpacks a tuple of ``names``."""
    return f"({names[0]},)" if len(names) == 1 else ", ".join(names)


def map_lines(maps: list[MapStat]) -> list[str]:
    """Tile code locating each (q_idx, kv_idx) in every pooled map: its element
    offset ``map_offset<m>`` and the weight ``map_scale<m>`` it contributes with."""
    lines = []
    for m, stat in enumerate(maps):
        bq, bk = stat.block_q, stat.block_k
        rows, row = ("1", "0 * q_idx") if bq is None else (f"((LQ + {bq - 1}) // {bq})", f"q_idx // {bq}")
        head = "b * (HQ // GROUP) + h // GROUP" if stat.reduce_heads else "b * HQ + h"
        # int64: a map may hold more than 2**31 entries (block 16 at 128k tokens: 2**26 per head)
        lines.append(f"map_offset{m} = (({head}).to(tl.int64) * {rows} + {row}) * ((LK + {bk - 1}) // {bk}) "
                     f"+ kv_idx // {bk}")
        if stat.reduce == "mean":  # positions per block; at least 1 also past the ends (no inf * 0 there)
            count_rows = "LQ" if bq is None else f"tl.maximum(tl.minimum({bq}, LQ - {row} * {bq}), 1)"
            count_cols = f"tl.maximum(tl.minimum({bk}, LK - kv_idx // {bk} * {bk}), 1)"
            lines.append(f"map_scale{m} = 1.0 / ({count_rows} * {count_cols}).to(tl.float32)")
        else:
            lines.append(f"map_scale{m} = 1.0")
    return lines


# The two loop directions: the tiles of one axis visited by a program owning a tile of the other.
_AXES = {
    "kv": dict(lo="kv_lo", hi="kv_hi", length="LK", block="BLOCK_N", other="q",
               tiles="kv_lo // BLOCK_N", other_tile="q_tile"),
    "q": dict(lo="q_lo", hi="q_hi", length="LQ", block="BLOCK_M", other="kv",
              tiles="q_lo // BLOCK_M", other_tile="kv_tile"),
}


def segment_names(axis: str, layout: str) -> list[str]:
    """The loop bounds ``<axis>_segments`` returns for a layout ("split", "masked" or "full")."""
    return [f"{axis}_{name}" for name in (SEGMENTS if layout == "split" else ("start", "end"))]


def tile_loop(axis: str, layout: str, mask_params: str, body: Callable[[str], str], indent: int,
              window: bool = False, descending: bool = False, plan_row: str | None = None,
              grouped: bool = True) -> str:
    """The loop of one program over the ``axis`` tiles ("kv" or "q") its mask plan visits.

    ``body(masked)`` is the code for one tile given the name of its masked
    flag. Layout "split": masked tiles, then tiles kept whole (no mask
    evaluated, no branch: the loop software-pipelines), then masked tiles;
    "masked": one loop that checks every tile, or, given ``plan_row`` (the
    program's (batch, head) row of the tile lists, as an expression; the
    lists' grid has the kernel's along axis 0), one over the live tiles
    ``_<axis>_tile_list`` listed (no branch around the loads: it pipelines);
    "full": every tile, unmasked.
    ``window``: only the tiles in ``[window_lo, window_hi)``, or the ``split``-th
    of ``SPLITS`` even shares of a list (split-KV decoding).
    ``descending``: the tiles from the last to the first (stick-breaking).
    ``grouped``: the lists hold the tiles kept whole, then those with masked positions, and each kind
    has a loop of its own (the whole tiles' without the mask); else one ascending list, each entry
    flagged, walked last tile first (``descending``: stick-breaking).
    """
    a = _AXES[axis]
    lo, hi, block = a["lo"], a["hi"], a["block"]
    q_tile, kv_tile = (a["other_tile"], a["tiles"]) if axis == "kv" else (a["tiles"], a["other_tile"])
    lines = []

    def add(text: str, depth: int) -> None:
        lines.extend("    " * depth + line if line.strip() else "" for line in text.rstrip("\n").split("\n"))

    def loop(start: str, end: str, comment: str) -> None:
        """``for <lo> in`` the tiles from ``start`` (a multiple of the block) up to ``end``, in order."""
        if not descending:
            add(f"for {lo} in range({start}, {end}, {block}):  # {comment}", 0)
            return
        add(f"tiles = ({end} - {start} + {block} - 1) // {block}", 0)
        add(f"for tile in range(0, tiles):  # {comment}, last first", 0)
        add(f"{lo} = {start} + (tiles - 1 - tile) * {block}", 1)

    def masked_loop(start: str, end: str) -> None:
        loop(start, end, "tiles with masked positions")
        add(f"{hi} = tl.minimum({lo} + {block}, {a['length']}) - 1", 1)
        add(f"live, masked = block_state(b, h, q_lo, q_hi, kv_lo, kv_hi, {q_tile}, {kv_tile}{mask_params})", 1)
        add("if live:", 1)
        add(body("masked"), 2)

    def listed_loop() -> None:
        tiles = "tl.num_programs(0) // SPLITS" if window else "tl.num_programs(0)"  # split-KV: SPLITS per tile
        add(f"live_tiles = TILES + ({plan_row} * {tiles} + {a['other_tile']}).to(tl.int64) "
            f"* (({a['length']} + {block} - 1) // {block} + 2)", 0)
        add("n_live = tl.load(live_tiles + 1)" if grouped else "n_live = tl.load(live_tiles)", 0)
        first, last = "0", "n_live"
        if window:  # this program's share of the list: an even one, so sparse rows keep every split busy
            first, last = "first", "last"
            add("share = (n_live + SPLITS - 1) // SPLITS", 0)
            add("first = tl.minimum(split * share, n_live)", 0)
            add("last = tl.minimum(first + share, n_live)", 0)
        if grouped:
            assert not descending, "grouped lists are walked in order"
            add("n_whole = tl.load(live_tiles)", 0)
            listed_group("first" if window else "0", "tl.minimum(last, n_whole)" if window else "n_whole",
                         "False", "kept whole")
            listed_group("tl.maximum(first, n_whole)" if window else "n_whole", last, "True", "with masked positions")
            return
        assert descending, "a list of flagged entries is walked last tile first (stick-breaking)"
        # each tile's entry is loaded one tile ahead, as in listed_group
        count = last if first == "0" else f"{last} - {first}"
        add(f"entry = tl.load(live_tiles + {last}, mask={count} > 0, other=0)", 0)
        add(f"for i in range(0, {count}):  # the live tiles _{axis}_tile_list found, last first", 0)
        add(f"next_entry = tl.load(live_tiles + {last} - 1 - i, mask=i + 1 < {count}, other=0)", 1)
        add(f"{lo} = entry // 2 * {block}", 1)
        add("masked = entry % 2 != 0", 1)
        add(body("masked"), 1)
        add("entry = next_entry", 1)

    def listed_group(start: str, end: str, masked: str, kind: str) -> None:
        """The listed tiles ``[start, end)`` of one kind, each entry loaded one tile ahead so that its K/V
        (Q/dO) addresses are known when the software pipeline issues their copies."""
        at, any_listed = ("2", f"{end} > 0") if start == "0" else (f"2 + {start}", f"{start} < {end}")
        add(f"entry = tl.load(live_tiles + {at}, mask={any_listed}, other=0)", 0)
        add(f"for i in range({start}, {end}):  # the live tiles _{axis}_tile_list found {kind}", 0)
        add(f"next_entry = tl.load(live_tiles + 3 + i, mask=i + 1 < {end}, other=0)", 1)
        add(f"{lo} = entry * {block}", 1)
        add(body(masked), 1)
        add("entry = next_entry", 1)

    def full_loop(start: str, end: str, comment: str) -> None:
        loop(start, end, comment)
        add(body("False"), 1)

    if layout == "full":
        first, last = ("window_lo", "window_hi") if window else ("0", a["length"])
        full_loop(first, last, "mask_mod is always True")
    elif plan_row is not None:
        listed_loop()
    else:
        other = a["other"]
        names = segment_names(axis, layout)
        add(f"{', '.join(names)} = {axis}_segments(b, h, {other}_lo, {other}_hi, {a['other_tile']}, "
            f"{a['length']}, {block}{mask_params})", 0)
        if window:  # this program's chunk of the range
            start, end = names[0], names[-1]
            add(f"{start} = tl.maximum({start}, window_lo)", 0)
            add(f"{end} = tl.maximum(tl.minimum({end}, window_hi), {start})", 0)
            for previous, name in zip(names[:-1], names[1:-1]):
                add(f"{name} = tl.minimum(tl.maximum({name}, {previous}), {end})", 0)
        if layout == "masked":
            masked_loop(names[0], names[-1])
        else:
            segments = [lambda: masked_loop(names[0], names[1]),
                        lambda: full_loop(names[1], names[2], "tiles every position of which is kept"),
                        lambda: masked_loop(names[2], names[3])]
            for segment in reversed(segments) if descending else segments:
                segment()
    return "\n".join(" " * indent + line if line else "" for line in lines)


def forward_state(family: str, differential: bool, affine: bool, expectations: list[int],
                  row_max: bool, support: bool = False, entropy: bool = False) -> list[tuple[str, bool]]:
    """The running state of the forward loop, ``(name, is a [rows, DV] tile)``: what a split-KV
    program hands to the combine kernel. The softmax family's is an online softmax (a second one,
    suffixed 2, for differential attention's second stream); stick-breaking's, the log of the stick
    its keys leave; the normalized family's, the sum of the weights (and with ``entropy`` the sum of
    w log w)."""
    state = [("acc", True)] + ([("remaining", False)] if family == "stick_breaking" else [])
    state += [("l_i", False)] if family == "normalized" else []
    state += [("w_log_w", False)] if entropy else []
    if family in ONLINE_FAMILIES:
        state += [("m_i", False), ("l_i", False)] + ([("acc_kept", True)] if affine else [])
        state += [("acc2", True), ("m_i2", False), ("l_i2", False)] if differential else []
    state += [(f"acc_exp{e}", False) for e in expectations]  # sum_j p_j g_j (the softmax's in units of exp(m_i))
    state += [("row_max", False), ("max_at", False)] if row_max else []
    return state + ([("support", False)] if support else [])


def threshold_context(normalization: Normalization) -> dict:
    """alpha, the Newton passes, the body of ``_entmax(u)`` and ``kept``, how many of each row's largest
    logits the first pass keeps to start the threshold, for the threshold family."""
    context = {"iterations": normalization.iterations, "kept": 16}
    if normalization.per_head:  # alpha - 1 comes in as am1, loaded per head
        return {**context, "alpha": "per head", "am1": "am1", "entmax_param": ", am1",
                "entmax_lines": _general_power_lines("(1.0 / am1 - 1.0)")}
    alpha = normalization.alpha
    power = 1.0 / (alpha - 1)  # the weight is u ** power, its derivative's part w = u ** (power - 1)
    whole = round(power)
    if abs(power - whole) < 1e-9:  # sparsemax (1), 1.5-entmax (2), 4/3 (3), 1.25 (4), ...
        lines = _power_lines("w", "u", whole - 1) + [f"return {'u' if whole == 1 else 'u * w'}, w"]
    else:
        lines = _general_power_lines(repr(power - 1.0))
    return {**context, "alpha": alpha, "am1": repr(alpha - 1), "entmax_param": "", "entmax_lines": lines}


def _general_power_lines(exponent: str) -> list[str]:
    """The body of ``_entmax(u)`` for w = u ** exponent (0 at u = 0) as exp2 of a multiple of log2(u)."""
    return [f"w = tl.where(u > 0.0, tl.exp2({exponent} * tl.log2(tl.where(u > 0.0, u, 1.0))), 0.0)",
            "return u * w, w"]


def _power_lines(name: str, base: str, exponent: int) -> list[str]:
    """Lines setting ``name`` to ``base ** exponent`` (``base`` >= 0) by squarings and multiplications;
    for exponent 0, 1 where ``base`` > 0 and 0 at 0 (the sparsemax support)."""
    if exponent == 0:
        return [f"{name} = tl.where({base} > 0.0, 1.0, 0.0)"]
    lines, factors, square, bit = [], [], base, 0
    while exponent:
        if exponent & 1:
            factors.append(square)
        exponent >>= 1
        if exponent:
            bit += 1
            lines.append(f"{base}{2 ** bit} = {square} * {square}")
            square = f"{base}{2 ** bit}"
    return lines + [f"{name} = {' * '.join(factors)}"]


def kv_loads(paged: bool, table: str) -> dict[str, Callable[[str, str], str]]:
    """The forward kernels' key and value tile loads, of ``(rows, even)``: the first ``rows`` keys (``even``:
    whether every tile is whole), dense or through the paged cache's ``table``. ``load_kt`` is the keys'
    second column part where the head dim is split (``DQK_T > 0``), ``load_k2`` the second half of the
    keys' columns (differential attention's K2)."""
    def load(tensor: str, cols: str, width: str) -> Callable[[str, str], str]:
        strides = ", ".join(f"stride_{tensor[0].lower()}{axis}" for axis in ("b", "h", "n", "d"))

        def rendered(rows: str, even: str) -> str:
            if paged:
                return (f"_load_pages({tensor}, {table}, {table}_s0, {table}_s1, PAGE, b, hk, offs_n, {cols}, "
                        f"{strides}, {rows}, {width})")
            return f"_load_tile({tensor}, b, hk, offs_n, {cols}, {strides}, {rows}, {width}, {even})"
        return rendered
    return {"load_k": load("K", "offs_dqk", "DQK"), "load_kt": load("K", "offs_dqt", "DQK"),
            "load_k2": load("K + DQK * stride_kd", "offs_dqk", "DQK"), "load_v": load("V", "offs_dv", "DV")}


def tile_function_lines(printer: TritonPrinter, output: str, name: str) -> list[str]:
    """The body of a function of a tile's ``qk`` (and indices) that computes the graph's ``output`` as
    ``name``: a float tile, even where it depends on one axis or none."""
    node = printer.graph.outputs[output]
    lines, _ = printer.statements({name: output})
    if printer.axes(node) != {"q", "kv"} or printer.graph.dtype(node) != "float":
        lines.append(f"{name} = {name} + tl.full(qk.shape, 0.0, tl.float32)")
    return lines


def score_functions(printer: TritonPrinter, output: str = "score", prefix: str = "",
                    name: str = "score") -> tuple[list[str], list[str], list[dict]]:
    """The bodies of a tile function computing the graph's ``output`` as ``name`` and of its backward (from
    the outputs ``<prefix>d_score``, ``<prefix>grad:k``), and the captured-tensor gradients that one returns:
    ``score_fn`` ("score"), differential attention's second stream ``score_fn2`` ("score2", prefix "score2.")
    and the weight families' ``logit_fn`` ("logit", prefix "logit.")."""
    graph = printer.graph
    score_lines = tile_function_lines(printer, output, name)
    grads = []
    while f"{prefix}grad:{len(grads)}" in graph.outputs:
        load = graph.outputs[f"{prefix}load:{len(grads)}"]
        grads.append({"k": len(grads), "capture": graph.node(load)["capture"], "load": load,
                      "axes": _axes_name(printer.index_axes(load))})
    targets = {"d_score": f"{prefix}d_score", **{f"grad{g['k']}": f"{prefix}grad:{g['k']}" for g in grads}}
    backward_lines, names = printer.statements(targets, also=tuple(i for g in grads for i in graph.args(g["load"])))
    backward_lines += [f"offset{g['k']} = {printer.offset(g['load'], names)}" for g in grads]
    return score_lines, backward_lines, grads


def capture_gradient_context(tagged_grads: list[tuple[str, dict]], stick: bool) -> dict:
    """How the backward kernels sum each captured-tensor gradient term (``tagged_grads``: (stream tag,
    term) pairs). A term whose index does not depend on the key is summed over each query row in the
    dQ kernel, one indexed by the key alone over each key's queries in the dK/dV kernel (stick-breaking
    has none: atomics); each part is stored with the flat index of its entry and torch adds them up.
    Terms indexed by both, all of them atomically added, are the ``atomic_grad_captures``."""
    rows = [(tag, g) for tag, g in tagged_grads if g["axes"] in ("", "q")]
    keys = [] if stick else [(tag, g) for tag, g in tagged_grads if g["axes"] == "kv"]
    atomic = {g["capture"] for _, g in tagged_grads if g["axes"] == "both" or (stick and g["axes"] == "kv")}
    context = {"atomic_grad_captures": repr(tuple(sorted(atomic)))}
    for name, terms, block, start, valid in (("row", rows, "BLOCK_M", "pid_bh * LQ + q_idx", "q_valid"),
                                             ("key", keys, "BLOCK_N", "(b * HQ + h) * LK + kv_idx", "kv_valid")):
        names = [f"{tag}{g['k']}" for tag, g in terms]
        context.update({
            f"{name}_grad_args": "".join(f", dcap_{name}s{n}, dcap_{name}s_at{n}" for n in names),
            f"{name}_grad_captures": repr(tuple(g["capture"] for _, g in terms)),
            # the lines around the loop: each row's (key's) running sum of a term and the index of its entry
            # (0 if no tile is visited: the sum stays 0), then their stores
            f"{name}_grad_starts": [line for n in names for line in (
                f"{name}_grad{n} = tl.full([{block}, 1], 0.0, tl.float32)",
                f"{name}_at{n} = tl.full([{block}, 1], 0, tl.int64)")],
            f"{name}_grad_stores": [line for n in names for line in (
                f"tl.store(dcap_{name}s{n} + {start}, {name}_grad{n}, mask={valid})",
                f"tl.store(dcap_{name}s_at{n} + {start}, {name}_at{n}, mask={valid})")],
        })
    return context


# |x| beyond which x log2(e), the exponent of exp2's weights, overflows float32
EXP2_LIMIT = 3.4028234663852886e38 / 1.4426950408889634


@dataclass(frozen=True)
class EntryPoint:
    """How a module's ``forward`` takes q, k and v and the call's own tensors, as attngen's calls take them:
    on KV caches (``cache``; ``paged``), on packed sequences (``packed``: ``cu_seqlens_q`` / ``_k``), with
    ``dropout`` (its ``dropout_p`` defaulting to the spec's, required where that is 0), with a block mask of
    blocks of ``block_size`` tokens (``block_mask``; None: none). It checks ``index_reads`` (see
    attngen.runtime.index_ranges) and, for packed sequences, the spec's own ``sequence_reads`` (of its own
    captured tensors, at ``sequence_captures`` among the module's) within each sequence.
    ``parameter_defaults``: the spec's number for each per-head parameter it fixes (None for a tensor), which
    ``forward`` may be called without."""
    cache: bool = False
    paged: bool = False
    packed: bool = False
    dropout: bool = False
    dropout_p: float = 0.0
    block_size: tuple[int, int] | None = None
    index_reads: tuple = ()
    sequence_reads: tuple = ()
    sequence_captures: tuple = ()
    parameter_defaults: tuple = ()

    def arguments(self) -> str:
        """The keyword arguments ``forward`` takes after ``q, k, v, *captured``."""
        arguments = ", block_mask" if self.block_size else ""
        arguments += ", block_table, kv_lens, q_offset=None" if self.paged else \
            ", kv_lens=None, q_offset=None" if self.cache else \
            ", cu_seqlens_q=None, cu_seqlens_k=None" if self.packed else ""
        if self.dropout:
            arguments += f", dropout_p={self.dropout_p!r}, seed=None" if self.dropout_p else ", dropout_p, seed=None"
        return arguments


def kernel_context(graph: Graph, spec_lines: list[str], normalization: Normalization, row_max: bool,
                   maps: list[MapStat], scale: float | None, split_kv: bool = False,
                   call_captures: dict[str, int] | None = None, differential: bool = False,
                   cache: bool = False, support: bool = False, top_k: int | None = None,
                   entropy: bool = False, entry_point: EntryPoint = EntryPoint()) -> dict:
    """Everything the template needs, derived from an optimized graph and the normalization."""
    call_captures = call_captures or {}
    printer = TritonPrinter(graph)
    outputs = graph.outputs
    online = normalization.family in ONLINE_FAMILIES
    softmax = online and not differential  # the single-stream online kernels (lse and delta)
    rectified = normalization.family == "rectified"
    normalized = normalization.family == "normalized"
    signed = normalization.family == "signed"
    stick = normalization.family == "stick_breaking"

    score_lines, backward_lines, grads = score_functions(printer)

    if graph.is_const(outputs["mask"], True):
        mask_lines = ["mask = q_valid & kv_valid  # mask_mod is always True"]
    else:
        mask_lines, _ = printer.statements({"mask": "mask"})

    state_lines, _ = printer.statements({"live": "block_live", "masked": "block_partial"})
    layouts = {axis: layout(graph, axis) for axis in _AXES}
    segment_lines = {axis: printer.statements({n: n for n in segment_names(axis, layouts[axis])})[0]
                     for axis in _AXES if layouts[axis] != "full"}
    # a masked axis's live tiles are listed by a first kernel where some tiles can be skipped
    pack_gqa = split_kv and same_for_all_heads(graph)
    skips = not graph.is_const(outputs["block_live"], True)
    tile_lists = [axis for axis in _AXES if layouts[axis] == "masked" and skips]
    per_head = depends_on_head(graph)  # else one tile list per batch entry serves every head
    plan_row = "(b * HQ + h)" if per_head else "b"

    expectations = list(range(sum(1 for name in outputs if name.startswith("exp") and "." not in name)))
    # stick-breaking's entropy, the last expectation (stats.kernel_expectations), is summed from the shares the
    # kernels hold (_stick_entropy): its traced g stays out of stat_fns, as does its derivative
    stick_entropy = expectations[-1] if normalization.family == "stick_breaking" and entropy else None
    traced = [e for e in expectations if e != stick_entropy]
    stat_targets = {f"{prefix}{e}": f"exp{e}{suffix}" for e in traced
                    for prefix, suffix in (("g", ""), ("dg", ".d_score"))}
    stat_lines, _ = printer.statements(stat_targets) if traced else ([], {})
    # g and g' are 0 at logits of -inf (weight 0), where score_mod can make one
    drops_minus_inf = bool(traced) and normalization.drops_minus_inf() and not graph.finite(
        outputs["logit" if normalization.family in WEIGHT_FAMILIES else "score"])
    used = {graph.input_name(n) for n in graph.order() if graph.op(n) == "input"}
    counts = [name for name in ("n_keys", "n_kept") if name in used]
    call_names = {i: name for name, i in call_captures.items()}
    captures = [{"index": i, "ndim": c.tensor.dim(), "kind": c.kind, "differentiable": c.differentiable,
                 "call": call_names.get(i)} for i, c in enumerate(graph.captures)]
    capture_names = [name for c in captures
                     for name in [f"cap{c['index']}"] + [f"cap{c['index']}_s{d}" for d in range(c["ndim"])]]
    tile_names = [name for j, t in enumerate(graph.tiles)
                  for name in [f"tile{j}"] + [f"tile{j}_s{d}" for d in range(len(t.dims))]]
    mask_params = "".join(f", {name}" for name in capture_names + tile_names)
    mask_inputs = ["b", "h", "q_idx", "kv_idx", "q_valid", "kv_valid"]
    threshold = normalization.family == "threshold"
    entmax_per_head = threshold and normalization.per_head  # alpha read per head, with a gradient
    threshold_entropy = threshold and entropy  # summed by the kernels themselves (see stats.ENTROPY_FAMILIES)
    normalized_entropy = normalized and entropy
    entropy_output = threshold_entropy or normalized_entropy  # a kernel output "entropy" (and its gradient)
    params = ["sink"] if normalization.sink is not None else ["alpha", "beta"] if normalization.affine else []
    params += ["entmax_alpha"] if entmax_per_head else []
    params += ["lam"] if differential else []
    affine = normalization.affine is not None
    # the softmax output kept in float32 for the backward's delta = dO . O (affine: its softmax part):
    # from an output rounded to half precision, delta's rounding error (coherent over a row) adds up
    # in the gradient of every learnable tensor, weighted by d logit / d tensor. It costs a float32
    # write of the whole output (and its memory), so only where a tensor learns (normalized weights too),
    # and for softpick, whose dS = e_j / N (dP_j - delta) cancels in dP_j - delta where a key weighs nearly 1,
    # times e_j / N up to 1 / eps: from a bfloat16 output, dQ up to 1.96x the rule's bound on a row of one key
    o_soft = (softmax or normalized) and (affine or rectified or normalization.learnable_sink
                                          or any(c["differentiable"] for c in captures))
    no_gradient = forward_only(maps)
    residuals = (["o_soft"] if o_soft else []) + (["n_kept"] if "n_kept" in used else []) \
        + (["max_at"] if row_max else []) + (["tau", "norm", "w_sum", "g_sum"] if threshold else []) \
        + (["w_log_p"] if threshold_entropy else []) + (["w_exp"] if threshold and expectations else []) \
        + (["floor"] if top_k is not None else []) \
        + (["norm"] if normalized else []) \
        + (["lse", "lse2", "o1", "o2"] if differential else [])
    stats = (["lse"] if softmax else []) + (["expectations"] if expectations else []) + (["row_max"] if row_max else [])
    stats += [f"map{m}" for m in range(len(maps))] + (["support"] if support else []) \
        + (["entropy"] if entropy_output else [])
    map_context = [{"index": m, "name": stat.name, "reduce": stat.reduce, "reduce_heads": stat.reduce_heads,
                    "rows": "1" if stat.block_q is None else f"_cdiv(LQ, {stat.block_q})",
                    "cols": f"_cdiv(LK, {stat.block_k})"} for m, stat in enumerate(maps)]
    summed_maps = [m for m in map_context if m["reduce"] != "max"]
    grad_maps = [m for m in summed_maps if m["name"] not in no_gradient]
    no_gradient_outputs = {f"map{m['index']}": no_gradient[m["name"]] for m in map_context if m["name"] in no_gradient}
    counted = support and not threshold  # the support counted by _attn_fwd (the threshold family's: its own kernel)
    state = forward_state(normalization.family, differential, affine, expectations, row_max, counted,
                          normalized_entropy)
    finals = (["LSE"] if softmax else []) + (["EXP"] if expectations else []) \
        + (["MAXOUT", "MAXAT"] if row_max else []) + (["ALPHA", "BETA"] if affine else []) \
        + (["OSOFT"] if o_soft else []) + (["NORM"] if normalized else []) \
        + (["LSE", "LSE2", "O1", "O2", "LAM"] if differential else []) + (["SUPPORT"] if counted else []) \
        + (["ENTROPY"] if normalized_entropy else [])
    final_values = (["lse"] if softmax else []) + (["expectations"] if expectations else []) \
        + (["row_max", "max_at"] if row_max else []) + (["alpha", "beta"] if affine else []) \
        + (["o_soft"] if o_soft else []) + (["norm"] if normalized else []) \
        + (["lse", "lse2", "o1", "o2", "lam"] if differential else []) + (["support"] if counted else []) \
        + (["entropy"] if normalized_entropy else [])
    partial_args = "".join(f", P_{name}" for name, _ in state)
    tile_args = ["qk"] + mask_inputs + counts + capture_names
    score2 = dict(zip(("score2_lines", "backward2_lines", "grads2"), score_functions(printer, "score2", "score2."))) \
        if differential else {}
    # the elementwise and normalized families' score_fn is the weight: the max and the expectations take
    # score_mod's logit, and their gradients that logit's derivatives
    logit = dict(zip(("logit_lines", "logit_backward_lines", "logit_grads"),
                     score_functions(printer, "logit", "logit.", "logit"))) if "logit" in outputs else {}
    tagged_grads = [("", g) for g in grads] + [("2_", g) for g in score2.get("grads2", [])] \
        + [("logit_", g) for g in logit.get("logit_grads", [])]
    return {
        "family_description": "differential attention (two softmax streams)" if differential else
                              f"{normalization.family} ({type(normalization).__name__})",
        "stick": stick,
        "differential": differential,
        **score2,
        "tile_args2": ", ".join(["qk2"] + tile_args[1:]),
        "logit_args": ", ".join(["dot * scale"] + tile_args[1:]),  # the forward tile's, for logit_fn
        "elementwise": normalization.family in WEIGHT_FAMILIES,  # masked keys weigh 0
        "normalized": normalized,
        "signed": signed,
        "threshold": threshold,
        "threshold_entropy": threshold_entropy,
        "normalized_entropy": normalized_entropy,
        "entropy_output": entropy_output,
        "entmax_per_head": entmax_per_head,
        **(threshold_context(normalization) if threshold else {}),
        **kv_loads("block_table" in call_captures, f"cap{call_captures.get('block_table')}"),
        # a KV cache's keys past kv_lens[b] are not loaded (zeros instead, masked): they may hold anything (NaN,
        # a paged cache's pages not in the pool), which masked weights times values would let into the output.
        # Tiles kept whole lie within kv_lens; the others load the first kv_rows keys (template: kv_rows_line)
        "kv_limit": lambda masked: ("kv_rows", "False") if cache and masked != "False" else ("LK", "EVEN_N"),
        "kv_lens_capture": f"cap{call_captures.get('kv_lens')}",
        "paged": "block_table" in call_captures,
        "table_capture": call_captures.get("block_table"),
        "top_k": top_k,
        "floor_index": call_captures.get("topk_floor"),  # the captured tensor of top-k's cut-offs
        "floor": f"cap{call_captures['topk_floor']}" if top_k is not None else None,
        "dropout": "dropout_seed" in call_captures,
        "dropout_args": "" if "dropout_seed" not in call_captures else
                        f"cap{call_captures['dropout_seed']}, cap{call_captures['dropout_p']}, ",
        "split_kv": split_kv,
        "pack_gqa": pack_gqa,
        "state": state,
        "state_vectors": repr([vector for _, vector in state]),
        "partial_args": partial_args,
        "final_outputs": "".join(f", {n}" for n in finals),
        "final_values": "".join(f", {n}" for n in final_values),
        "output_args": partial_args if split_kv else "".join(f", {n}" for n in finals),
        "version": __version__,
        "template_version": TEMPLATE_VERSION,
        "fingerprint": graph.fingerprint(),
        "spec_lines": docstring_lines(spec_lines),
        "softmax": softmax,
        "online": online,
        # a finite score past EXP2_LIMIT (torch.finfo(torch.float32).min for a masked key) can only come from a
        # constant of score_mod: exp2's weights would be inf - inf for a row of them, so such specs take exp
        "natural_exp": online and any(EXP2_LIMIT < abs(c) < math.inf
                                      for c in graph.float_constants(("score", "score2"))),
        "rectified": rectified,
        "eps": repr(normalization.eps) if rectified or normalized else None,
        "sink": normalization.sink is not None,
        "affine": affine,
        # affine softmax: the tiles a row keeps whole add their values' column sums, which the launcher
        # computes per tile; decoding (a KV cache, which that would read whole, or keys split over programs)
        # and dropout take the masked tiles' dot
        "value_sums": affine and not (cache or split_kv) and "dropout_seed" not in call_captures,
        "o_soft": o_soft,
        "uses_kept": "n_kept" in used,
        "norm_params": params,
        "params_unpack": _unpack(params) if params else "",
        "dparams_unpack": _unpack([f"d{p}" for p in params]) if params else "",
        "residuals_unpack": _unpack(residuals) if residuals else "",
        "residual_names": "".join(f"{r}, " for r in residuals),
        "stat_names": "".join(f"{name}, " for name in stats),
        "stats_unpack": _unpack(stats) if stats else "",
        "dstats_unpack": _unpack([f"d{name}" for name in stats]) if stats else "",
        # the gradients of the statistics whose backward terms the dQ and dK/dV kernels add (HAS_DSTATS)
        "stat_grads": [f"d{name}" for name in stats
                       if name in ("expectations", "entropy", "row_max")]
                      + [f"dmap{m['index']}" for m in grad_maps],
        "expectations": expectations,
        "row_max": row_max,
        "logit_lines": [], "logit_backward_lines": [], "logit_grads": [], **logit,
        "support": support,
        "scale": repr(None if scale is None else float(scale)),
        # the softmax of q . k^T * scale itself, scale > 0 (None: 1/sqrt(Dqk)): its weights fold the scale into
        # exp2's multiply-add, exp2(dot * scale log2 e - max log2 e), and the row max is the products' max, scaled
        "scaled_dot": online and not differential and graph.input_name(outputs["score"]) == "score"
                      and (scale is None or scale > 0),
        "maps": map_context,
        "summed_maps": repr([f"the {m['name']} map" for m in summed_maps]),
        "forward_only_stats": repr(no_gradient_outputs),
        "grad_maps": grad_maps,
        # the row-dot pass adds the maps' part of delta, the row term of the weights that have one
        "maps_rowdot": bool(grad_maps) and (softmax or threshold or normalized),
        "map_lines": map_lines(maps),
        "qk_parts_source": inspect.getsource(qk_parts).rstrip(),
        "cache": cache,
        **_attention_entry_point(entry_point, params),
        "map_dp": " + ".join(f"tl.load(DMAP{m['index']} + map_offset{m['index']}, mask=keep, other=0.0)"
                             f" * map_scale{m['index']}" for m in grad_maps),
        "stat_lines": stat_lines,
        "drops_minus_inf": drops_minus_inf,
        "stat_fn_outputs": list(stat_targets),
        "traced_expectations": traced,
        "stick_entropy": stick_entropy,
        "stat_values": ", ".join(f"g{e}, dg{e}" for e in traced),
        "stat_dp": " + ".join(f"dexp{e} * (g{e} + dg{e})" for e in traced),
        # the threshold family's: the part through the weights and the direct one, apart
        "exp_dp": " + ".join(f"dexp{e} * g{e}" for e in traced),
        "exp_ds": " + ".join(f"dexp{e} * dg{e}" for e in traced),
        "captures": captures,
        **capture_gradient_context(tagged_grads, stick),
        "dcapture_args": "".join(f", dcap{c['index']}" for c in captures if c["differentiable"]),
        "mask_args": ", ".join(mask_inputs + capture_names),
        "tile_inputs": ", ".join(mask_inputs + counts + capture_names),
        "tile_args": ", ".join(tile_args),
        "score_lines": score_lines,
        "mask_lines": mask_lines,
        "state_lines": state_lines,
        "layouts": layouts,
        "segment_lines": segment_lines,
        "segment_names": {axis: ", ".join(segment_names(axis, layout)) for axis, layout in layouts.items()},
        "mask_params": mask_params,
        "tile_summaries": repr(tuple((t.capture, t.reduce, t.dims) for t in graph.tiles)),
        "tile_lists": tile_lists,
        "list_param": {axis: ", TILES" if axis in tile_lists else "" for axis in _AXES},
        "plan_heads": "HQ" if per_head else "1",
        # a GQA-packed program reads its batch entry's list (its plan is the same for every head)
        "tile_loop": lambda axis, body, indent, window=False, descending=False, packed=False: tile_loop(
            axis, layouts[axis], mask_params, body, indent, window, descending,
            ("b" if packed else plan_row) if axis in tile_lists else None, grouped=not stick),
        "backward_lines": backward_lines,
        "grads": grads,
    }


def _tidy(source: str) -> str:
    """``source`` without the functions it never calls, and at most two blank lines in a row (sections a
    spec leaves out would otherwise leave more)."""
    return re.sub(r"\n{4,}", "\n\n\n", without_unused_functions(source))


def render(graph: Graph, spec_lines: list[str], normalization: Normalization, row_max: bool = False,
           maps: list[MapStat] = (), scale: float | None = None, split_kv: bool = False,
           call_captures: dict[str, int] | None = None, differential: bool = False, cache: bool = False,
           support: bool = False, top_k: int | None = None, entropy: bool = False,
           entry_point: EntryPoint = EntryPoint()) -> str:
    """The Python source of the kernel module for ``graph``; ``row_max`` adds each row's max
    logit to the outputs, ``maps`` the block-pooled weight maps, ``support`` each row's count of
    nonzero weights (normalizations with ``exact_zeros``), ``entropy`` the rows' entropy (an output of
    its own for sparsemax / entmax and normalized weights; a softmax's comes from its lse and mean
    logit); ``scale`` None means 1/sqrt(Dqk);
    ``split_kv`` splits the forward pass's keys over programs and merges them (decoding);
    ``call_captures`` locates the call's own tensors among the captured ones, by name (see
    :class:`~attngen.runtime.variants.Variant`): a KV cache's ``kv_lens`` / ``q_offset``, packed sequences'
    positions, and those the kernels read themselves: a paged cache's ``block_table``, ``dropout_seed`` /
    ``dropout_p``; ``differential``: two score streams over the halves of q and k (outputs ``score`` and
    ``score2``), weighted by the per-head parameter ``lam``;
    ``cache``: k and v are KV caches, of which a call reads only the first ``kv_lens`` keys; ``top_k``:
    each row keeps its ``top_k`` largest logits (a cut-off per row, ``call_captures["topk_floor"]``);
    ``entry_point``: how the module's ``forward`` takes a call."""
    context = kernel_context(graph, spec_lines, normalization, row_max, list(maps), scale, split_kv,
                             call_captures or {}, differential, cache, support, top_k, entropy, entry_point)
    return _tidy(environment().get_template(TEMPLATE).render(**context))


def _entry_point(max_head_dim: int, *functions, **constants) -> dict:
    """The template values with which a module's entry point takes q, k and v as attngen's calls do, with
    more of attngen/qkv.py's ``functions`` (for the call's own tensors) and the ``constants`` they read."""
    return {"qkv_source": "\n\n\n".join(inspect.getsource(f).rstrip()
                                       for f in (check_qkv, check_device, under_autocast, *functions)),
            "qkv_constants": {"KERNEL_DTYPES": repr(KERNEL_DTYPES), "MAX_HEAD_DIM": repr(max_head_dim),
                              **{name: repr(value) for name, value in constants.items()}}}


def _attention_entry_point(entry_point: EntryPoint, norm_params: list[str]) -> dict:
    """The template values of an attention module's entry point (see :class:`EntryPoint`), which takes the
    per-head tensors ``norm_params`` after the captured ones."""
    checks = inspect.getsource(index_checks)
    block_mask = {"BLOCK_SIZE": entry_point.block_size} if entry_point.block_size else {}
    return {
        "packed": entry_point.packed,
        "block_mask": bool(block_mask),
        "call_arguments": entry_point.arguments(),
        **_entry_point(MAX_HEAD_DIM, values_checkable, least_and_greatest, kept_extremes, check_launch,
                       per_head_tensor,
                       *((check_entmax_alpha,) if "entmax_alpha" in norm_params else ()),
                       *((per_batch_integers, cache_positions) if entry_point.cache else ()),
                       *((paged_view, check_pages_in_range) if entry_point.paged else ()),
                       *((jagged_at_length, tensor_kind, jagged_view, packed_output, packed_view, packed_positions)
                         if entry_point.packed else ()),
                       *((dropout_rate, dropout_tensors) if entry_point.dropout else ()),
                       *((describe_value, dense_block_size, block_matrix, scatter_blocks, flex_block_mask,
                          flex_mask_mod, flex_blocks) if block_mask else ()),
                       GRID_AXIS_LIMIT=GRID_AXIS_LIMIT, **block_mask),
        # index_checks below its imports
        "index_checks_source": checks[checks.index("\nINDICES = "):].strip(),
        "index_reads": [repr(tuple(read)) for read in entry_point.index_reads],
        "sequence_reads": [repr(tuple(read)) for read in entry_point.sequence_reads],
        "sequence_captures": repr(tuple(entry_point.sequence_captures)),
        "parameter_defaults": repr(tuple(entry_point.parameter_defaults)),
    }


def render_linear(graph: Graph, spec_lines: list[str], normalize: bool, scale: float | None, eps: float,
                  log_decay: float | None) -> str:
    """The Python source of a linear attention module; ``graph`` is the optimized trace of its feature
    map (output ``score`` and its derivative ``d_score``); ``scale``, ``eps`` and the fixed ``log_decay``
    of each token are the spec's, its entry point's defaults (``scale`` None: 1/sqrt(Dqk); ``log_decay``
    None: none, the decay is learnable or gated)."""
    feature_lines, feature_backward_lines, _ = score_functions(TritonPrinter(graph))
    return _tidy(environment().get_template(LINEAR_TEMPLATE).render(
        version=__version__, template_version=TEMPLATE_VERSION, fingerprint=graph.fingerprint(),
        spec_lines=docstring_lines(spec_lines), normalize=normalize, feature_lines=feature_lines,
        feature_backward_lines=feature_backward_lines, scale=repr(None if scale is None else float(scale)),
        eps=repr(float(eps)), log_decay=repr(log_decay), **_entry_point(LINEAR_MAX_HEAD_DIM)))
