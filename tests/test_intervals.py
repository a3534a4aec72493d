"""Tests for the interval mask analysis (``attngen.ir.passes.intervals``).

Soundness is checked by brute force: the user's mask_mod is evaluated with
torch (or plain Python) on every position of a rectangle, independently of the
IR, and compared with ``block_live`` / ``block_full`` evaluated on the graph by
the small scalar evaluator below.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attngen.ir.graph import OPS, Graph
from attngen.ir.passes.intervals import block_bounds
from attngen.trace import Proxy, trace

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- a tiny scalar evaluator (independent of attngen.ir.evaluate) ---------------

def evaluate(graph: Graph, name: str, env: dict):
    values = {}
    for n in graph.order([graph.outputs[name]]):
        attrs = graph.node(n)
        op, args = attrs["op"], [values[a] for a in attrs["args"]]
        if op == "input":
            value = env[attrs["name"]]  # KeyError if e.g. q_idx leaks into a block output
        elif op == "const":
            value = attrs["value"]
        elif op == "load":
            value = graph.captures[attrs["capture"]].tensor[tuple(args)].item()
        else:
            value = OPS[op].evaluate(*args)
        values[n] = {"bool": bool, "int": int, "float": float}[attrs["dtype"]](value)
    return values[graph.outputs[name]]


def block(graph: Graph, b, h, q_lo, q_hi, kv_lo, kv_hi) -> tuple[bool, bool]:
    env = {"b": b, "h": h, "q_lo": q_lo, "q_hi": q_hi, "kv_lo": kv_lo, "kv_hi": kv_hi}
    return evaluate(graph, "block_live", env), evaluate(graph, "block_full", env)


def truth(mask_mod, b, h, q_lo, q_hi, kv_lo, kv_hi) -> torch.Tensor:
    """The mask on the whole rectangle, computed by torch on the user's function."""
    q = torch.arange(q_lo, q_hi + 1).view(-1, 1)
    kv = torch.arange(kv_lo, kv_hi + 1).view(1, -1)
    m = torch.as_tensor(mask_mod(torch.tensor(b), torch.tensor(h), q, kv))
    return m.expand(q.shape[0], kv.shape[1]).bool()


def check_sound(graph, mask_mod, b, h, q_lo, q_hi, kv_lo, kv_hi) -> tuple[bool, bool]:
    live, full = block(graph, b, h, q_lo, q_hi, kv_lo, kv_hi)
    m = truth(mask_mod, b, h, q_lo, q_hi, kv_lo, kv_hi)
    rect = (b, h, q_lo, q_hi, kv_lo, kv_hi)
    assert live or not m.any(), f"block_live False but the mask is True somewhere in {rect}"
    assert not full or m.all(), f"block_full True but the mask is False somewhere in {rect}"
    return live, full


def analysed(mask_mod) -> Graph:
    graph = block_bounds(trace(None, mask_mod))
    for out in ("block_live", "block_full"):
        node = graph.outputs[out]
        assert graph.dtype(node) == "bool"
        assert not graph.depends_on(node, "q_idx") and not graph.depends_on(node, "kv_idx")
    return graph


rectangles = st.tuples(
    st.integers(0, 3), st.integers(0, 3),  # b, h
    st.integers(0, 200), st.integers(0, 24),  # q_lo, q width - 1
    st.integers(0, 200), st.integers(0, 24),  # kv_lo, kv width - 1
).map(lambda t: (t[0], t[1], t[2], t[2] + t[3], t[4], t[4] + t[5]))


# -- the classic masks -----------------------------------------------------------

def causal(b, h, q, kv):
    return q >= kv


def sliding(w):
    return lambda b, h, q, kv: (q - kv >= 0) & (q - kv < w)


def prefix_lm(p):
    return lambda b, h, q, kv: (kv < p) | (q >= kv)


def chunked(c):
    return lambda b, h, q, kv: (q // c) == (kv // c)


def dilated(d, w):
    return lambda b, h, q, kv: ((q - kv) % d == 0) & (q - kv >= 0) & (q - kv < w)


def anti_causal(b, h, q, kv):
    return ~(q >= kv)


DOC_IDS = torch.repeat_interleave(torch.arange(6), torch.tensor([30, 50, 7, 60, 40, 113]))  # 300 tokens


def document(b, h, q, kv):
    return DOC_IDS[q] == DOC_IDS[kv]


LENGTHS = torch.tensor([40, 120, 0, 230])


def padded(b, h, q, kv):  # keys beyond the length of sequence b are padding
    return kv < LENGTHS[b]


def head_gated(b, h, q, kv):
    return (q >= kv) | (h == 0)


def clamp_mask(b, h, q, kv):
    return torch.clamp(q - kv, -8, 8) * 3 >= torch.maximum(kv - q, torch.abs(q - 100)) - 50


def affine_float(b, h, q, kv):
    return q * 0.5 - kv * 0.25 + 1.5 >= 0


def where_mask(b, h, q, kv):
    return torch.where(q > 64, kv < 32, (q - kv) % 16 < 8) ^ (kv // 50 == 2)


def half_bounded(b, h, q, kv):  # min(load, q) <= q_hi: full once q_hi <= kv_lo
    return torch.minimum(DOC_IDS[kv] * 1000, q) <= kv


def smooth(b, h, q, kv):  # monotone float functions
    return (torch.tanh((q - kv) * 0.05) > 0.5) | (torch.sigmoid(kv * 0.1 - 5.0) < 0.3)


def float_mod(b, h, q, kv):
    return (q * 0.25) % 3.0 > 2.6


def abs_load(b, h, q, kv):  # abs of an unbounded int is only known to be >= 0
    return abs(DOC_IDS[q] - 2) >= 1


def converted(b, h, q, kv):  # block-causal through conversions: floats to ints round toward zero
    return ((q - 7).float() / 16.0).long() >= (kv.float() / 16.0).to(torch.int32)


def periodic(b, h, q, kv):
    return torch.cos(q * 0.1) + torch.sin(kv * 0.3) > 0.5


NAMED = {
    "causal": causal, "sliding": sliding(40), "prefix_lm": prefix_lm(37), "chunked": chunked(32),
    "dilated": dilated(3, 100), "anti_causal": anti_causal, "document": document, "padded": padded,
    "head_gated": head_gated, "clamp": clamp_mask, "affine_float": affine_float, "where": where_mask,
    "half_bounded": half_bounded, "smooth": smooth, "float_mod": float_mod, "abs_load": abs_load,
    "converted": converted, "periodic": periodic,
}


@pytest.mark.parametrize("name", sorted(NAMED))
@SETTINGS
@given(rect=rectangles)
def test_named_masks_sound(name, rect):
    check_sound(analysed(NAMED[name]), NAMED[name], *rect)


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_masks_sound_on_a_grid(name):
    """Every 16x16 tile of a 256x256 score matrix, plus some ragged ones."""
    mask_mod, graph = NAMED[name], analysed(NAMED[name])
    for b, h in ((0, 0), (1, 2), (3, 1)):
        for q_lo, kv_lo in itertools.product(range(0, 224, 16), repeat=2):
            check_sound(graph, mask_mod, b, h, q_lo, q_lo + 15, kv_lo, kv_lo + 15)
        for q_lo, kv_lo in itertools.product(range(3, 224, 37), range(5, 224, 41)):
            check_sound(graph, mask_mod, b, h, q_lo, q_lo + 36, kv_lo, kv_lo + 40)


# -- precision on the easy cases --------------------------------------------------

@SETTINGS
@given(rect=rectangles)
def test_causal_is_precise(rect):
    b, h, q_lo, q_hi, kv_lo, kv_hi = rect
    live, full = check_sound(analysed(causal), causal, *rect)
    assert live == (q_hi >= kv_lo)  # live unless strictly above the diagonal
    assert full == (q_lo >= kv_hi)  # full when entirely on/below the diagonal


def test_causal_blocks():
    graph = analysed(causal)
    assert block(graph, 0, 0, 0, 63, 64, 127) == (False, False)  # strictly above the diagonal
    assert block(graph, 0, 0, 64, 127, 0, 63) == (True, True)  # strictly below
    assert block(graph, 0, 0, 64, 127, 64, 127) == (True, False)  # on the diagonal


def test_conversions_keep_their_blocks():
    """A block-causal mask written with .long() skips the tiles above its diagonal and keeps those below
    whole; cos / sin are within [-1, 1]."""
    graph = analysed(converted)
    assert block(graph, 0, 0, 7, 22, 23, 38) == (False, False)
    assert block(graph, 0, 0, 39, 54, 0, 31) == (True, True)
    assert block(analysed(periodic), 0, 0, 0, 15, 0, 15) == (True, False)
    assert block(analysed(lambda b, h, q, kv: torch.cos(q * 0.1) > 1.5), 0, 0, 0, 15, 0, 15) == (False, False)


def test_anti_causal_is_the_complement():
    graph = analysed(anti_causal)
    assert block(graph, 0, 0, 0, 63, 64, 127) == (True, True)
    assert block(graph, 0, 0, 64, 127, 0, 63) == (False, False)
    assert block(graph, 0, 0, 64, 127, 64, 127) == (True, False)


@SETTINGS
@given(w=st.integers(1, 300), rect=rectangles)
def test_sliding_window_is_precise(w, rect):
    b, h, q_lo, q_hi, kv_lo, kv_hi = rect
    live, full = check_sound(analysed(sliding(w)), sliding(w), *rect)
    assert live == (q_hi - kv_lo >= 0 and q_lo - kv_hi < w)
    assert full == (q_lo - kv_hi >= 0 and q_hi - kv_lo < w)


def test_sliding_window_far_blocks_are_dead():
    graph = analysed(sliding(128))
    assert block(graph, 0, 0, 1024, 1087, 0, 63) == (False, False)  # far below the band
    assert block(graph, 0, 0, 0, 63, 64, 127) == (False, False)  # above the diagonal
    assert block(graph, 0, 0, 128, 191, 64, 127)[0]


@SETTINGS
@given(p=st.integers(0, 200), rect=rectangles)
def test_prefix_lm(p, rect):
    b, h, q_lo, q_hi, kv_lo, kv_hi = rect
    live, full = check_sound(analysed(prefix_lm(p)), prefix_lm(p), *rect)
    assert live == (kv_lo < p or q_hi >= kv_lo)
    assert full == (kv_hi < p or q_lo >= kv_hi)


@SETTINGS
@given(c=st.integers(1, 100), rect=rectangles)
def test_chunked(c, rect):
    b, h, q_lo, q_hi, kv_lo, kv_hi = rect
    live, full = check_sound(analysed(chunked(c)), chunked(c), *rect)
    assert live == (q_hi // c >= kv_lo // c and kv_hi // c >= q_lo // c)  # the chunk ranges overlap
    assert full == (q_lo // c == q_hi // c == kv_lo // c == kv_hi // c)


@SETTINGS
@given(d=st.integers(1, 9), w=st.integers(1, 200), rect=rectangles)
def test_dilated(d, w, rect):
    live, full = check_sound(analysed(dilated(d, w)), dilated(d, w), *rect)
    b, h, q_lo, q_hi, kv_lo, kv_hi = rect
    if q_hi < kv_lo or q_lo - kv_hi >= w:
        assert not live


def test_dilated_single_positions_are_exact():
    graph = analysed(dilated(4, 50))
    for q, kv in itertools.product(range(0, 80, 3), range(0, 80, 5)):
        expected = (q - kv) % 4 == 0 and 0 <= q - kv < 50
        assert block(graph, 0, 0, q, q, kv, kv) == (expected, expected)


def test_document_mask_stays_unknown():
    graph = analysed(document)
    for rect in [(0, 0, 0, 15, 0, 15), (0, 0, 0, 15, 200, 215), (1, 1, 100, 163, 0, 63)]:
        assert check_sound(graph, document, *rect) == (True, False)


def test_loads_indexed_by_b_are_exact():
    graph = analysed(padded)
    assert block(graph, 0, 0, 0, 63, 0, 39) == (True, True)
    assert block(graph, 0, 0, 0, 63, 32, 63) == (True, False)
    assert block(graph, 0, 0, 0, 63, 40, 103) == (False, False)
    assert block(graph, 2, 0, 0, 63, 0, 63) == (False, False)  # empty sequence


def test_exact_head_input():
    graph = analysed(head_gated)
    assert block(graph, 0, 0, 0, 63, 64, 127) == (True, True)
    assert block(graph, 0, 1, 0, 63, 64, 127) == (False, False)


def test_half_bounded_minimum():
    graph = analysed(half_bounded)
    assert check_sound(graph, half_bounded, 0, 0, 0, 15, 16, 31) == (True, True)
    assert check_sound(graph, half_bounded, 0, 0, 16, 31, 0, 15) == (True, False)


def test_monotone_float_functions():
    graph = analysed(smooth)
    assert check_sound(graph, smooth, 0, 0, 100, 120, 0, 40) == (True, True)  # tanh(>= 3) > 0.5
    assert check_sound(graph, smooth, 0, 0, 0, 20, 60, 100) == (False, False)


def test_float_mod_is_conservative():
    """Float ``%`` is only bounded by [0, c] (rounding can reach c itself)."""
    graph = analysed(float_mod)
    assert check_sound(graph, float_mod, 0, 0, 0, 7, 0, 7) == (True, False)  # imprecise: q/4 < 2
    assert check_sound(graph, float_mod, 0, 0, 0, 15, 0, 7) == (True, False)
    graph = analysed(lambda b, h, q, kv: (q * 0.25) % 3.0 <= 3.0)
    assert block(graph, 0, 0, 0, 99, 0, 99) == (True, True)


def test_float_mask():
    graph = analysed(affine_float)
    # q/2 - kv/4 + 1.5 >= 0  <=>  kv <= 2q + 6
    assert check_sound(graph, affine_float, 0, 0, 10, 20, 0, 26) == (True, True)
    assert check_sound(graph, affine_float, 0, 0, 10, 20, 47, 60) == (False, False)


@pytest.mark.parametrize("value", [True, False])
def test_constant_masks(value):
    graph = block_bounds(trace(None, lambda b, h, q, kv: value))
    for out in ("block_live", "block_full"):
        node = graph.outputs[out]
        assert graph.op(node) == "const" and graph.node(node)["value"] is value


def test_no_mask_means_full():
    graph = block_bounds(trace(None, None))
    assert block(graph, 0, 0, 0, 1, 0, 1) == (True, True)
    assert graph.op(graph.outputs["block_full"]) == "const"


def test_original_outputs_are_kept():
    graph = trace(lambda s, b, h, q, kv: s * 2.0, causal)
    out = block_bounds(graph)
    assert set(out.outputs) == {"score", "mask", "block_live", "block_full"}
    env = {"score": 1.5, "b": 0, "h": 0, "q_idx": 3, "kv_idx": 5}
    assert evaluate(out, "score", env) == 3.0 and evaluate(out, "mask", env) is False
    assert set(graph.outputs) == {"score", "mask"}  # the input graph is untouched


def test_unmodelled_ops_are_unknown():
    graph = analysed(lambda b, h, q, kv: torch.sqrt(q * 1.0) > torch.exp(kv * 0.01))
    assert block(graph, 0, 0, 0, 15, 0, 15) == (True, False)
    graph = analysed(lambda b, h, q, kv: (q & kv) == 0)  # bitwise and on ints
    assert block(graph, 0, 0, 0, 15, 0, 15) == (True, False)


# -- random masks -------------------------------------------------------------------

def _is_proxy(*xs):
    return any(isinstance(x, Proxy) for x in xs)


def _minmax(fn, pyfn, bound):
    def apply(a, b):
        if not _is_proxy(a, b):
            return pyfn(a, b)
        if not isinstance(a, Proxy):
            a, b = b, a
        if not isinstance(b, Proxy):  # torch.minimum needs two tensors: clamp(proxy, max=c)
            return torch.clamp(a, **{bound: b})
        return fn(a, b)
    return apply


# op -> function usable both on proxies (tracing) and on Python scalars (ground truth)
INT_OPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "neg": lambda a: -a,
    "abs": lambda a: abs(a),
    "inv": lambda a: ~a,
    "min": _minmax(torch.minimum, min, "max"),
    "max": _minmax(torch.maximum, max, "min"),
    "b2i": lambda c: c + 0,
}
CMP_OPS = ["lt", "le", "gt", "ge", "eq", "ne"]


def interpret(tree, env):
    kind = tree[0]
    if kind == "var":
        return env[tree[1]]
    if kind in ("const", "bconst"):
        return tree[1]
    if kind in ("mulc", "fdiv", "mod", "pow"):
        x, c = interpret(tree[1], env), tree[2]
        return {"mulc": lambda: x * c, "fdiv": lambda: x // c, "mod": lambda: x % c, "pow": lambda: x ** c}[kind]()
    if kind == "cmp":
        a, b = interpret(tree[2], env), interpret(tree[3], env)
        return {"lt": lambda: a < b, "le": lambda: a <= b, "gt": lambda: a > b,
                "ge": lambda: a >= b, "eq": lambda: a == b, "ne": lambda: a != b}[tree[1][1]]()
    args = [interpret(t, env) for t in tree[1:]]
    if kind in INT_OPS:
        return INT_OPS[kind](*args)
    if kind in ("and", "or", "xor"):
        a, b = args
        return {"and": a & b, "or": a | b, "xor": a ^ b}[kind]
    if kind == "not":
        (a,) = args
        return ~a if _is_proxy(a) else not a
    if kind in ("where", "bwhere"):
        c, a, b = args
        if not _is_proxy(c):
            return a if c else b
        return torch.where(c, a, b)
    raise AssertionError(kind)


leaves = st.one_of(
    st.sampled_from([("var", "q"), ("var", "kv"), ("var", "b"), ("var", "h")]),
    st.builds(lambda c: ("const", c), st.integers(-20, 20)),
)


@st.composite
def int_exprs(draw, depth=3):
    if depth == 0 or draw(st.integers(0, 4)) == 0:
        return draw(leaves)
    sub = int_exprs(depth - 1)
    kind = draw(st.sampled_from(
        ["add", "sub", "add", "sub", "mul", "mulc", "neg", "abs", "inv", "min", "max",
         "fdiv", "mod", "pow", "where", "b2i"]))
    if kind in ("add", "sub", "mul", "min", "max"):
        return (kind, draw(sub), draw(sub))
    if kind in ("neg", "abs", "inv"):
        return (kind, draw(sub))
    if kind == "mulc":
        return (kind, draw(sub), draw(st.integers(-4, 4)))
    if kind in ("fdiv", "mod"):
        return (kind, draw(sub), draw(st.integers(-6, 9).filter(lambda c: c != 0)))
    if kind == "pow":
        return (kind, draw(sub), draw(st.integers(0, 3)))
    if kind == "b2i":
        return (kind, draw(bool_exprs(depth - 1)))
    return ("where", draw(bool_exprs(depth - 1)), draw(sub), draw(sub))


@st.composite
def bool_exprs(draw, depth=3):
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        if draw(st.integers(0, 9)) == 0:
            return ("bconst", draw(st.booleans()))
        d = max(depth - 1, 0)
        return ("cmp", ("op", draw(st.sampled_from(CMP_OPS))), draw(int_exprs(d)), draw(int_exprs(d)))
    sub = bool_exprs(depth - 1)
    kind = draw(st.sampled_from(["and", "or", "xor", "not", "cmp", "cmp", "bwhere"]))
    if kind in ("and", "or", "xor"):
        return (kind, draw(sub), draw(sub))
    if kind == "not":
        return (kind, draw(sub))
    if kind == "cmp":
        return ("cmp", ("op", draw(st.sampled_from(CMP_OPS))), draw(int_exprs(depth)), draw(int_exprs(depth)))
    return ("bwhere", draw(sub), draw(sub), draw(sub))


def _mask_of(tree):
    return lambda b, h, q, kv: interpret(tree, {"b": b, "h": h, "q": q, "kv": kv})


small_rectangles = st.tuples(
    st.integers(0, 3), st.integers(0, 3), st.integers(-10, 60), st.integers(0, 9),
    st.integers(-10, 60), st.integers(0, 9),
).map(lambda t: (t[0], t[1], t[2], t[2] + t[3], t[4], t[4] + t[5]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=bool_exprs(), rects=st.lists(small_rectangles, min_size=1, max_size=4))
def test_random_masks_sound_and_exact_at_points(tree, rects):
    mask_mod = _mask_of(tree)
    graph = analysed(mask_mod)
    for b, h, q_lo, q_hi, kv_lo, kv_hi in rects:
        live, full = block(graph, b, h, q_lo, q_hi, kv_lo, kv_hi)
        values = [bool(mask_mod(b, h, q, kv))
                  for q in range(q_lo, q_hi + 1) for kv in range(kv_lo, kv_hi + 1)]
        assert live or not any(values), f"block_live False but a position is True: {tree}, {(q_lo, q_hi, kv_lo, kv_hi)}"
        assert not full or all(values), f"block_full True but a position is False: {tree}, {(q_lo, q_hi, kv_lo, kv_hi)}"
        # on a single position every rule is exact
        q, kv = q_lo, kv_lo
        expected = bool(mask_mod(b, h, q, kv))
        assert block(graph, b, h, q, q, kv, kv) == (expected, expected), tree


# -- the numeric intervals themselves ----------------------------------------------

def int_bounds(tree) -> tuple[Graph, bool, bool]:
    """A graph with outputs ``lo``/``hi``: the analysis' bounds of the int expression ``tree``."""
    from attngen.ir.graph import rebuild
    from attngen.ir.passes.intervals import IntervalAnalysis

    graph = rebuild(trace(None, lambda b, h, q, kv: interpret(tree, {"b": b, "h": h, "q": q, "kv": kv}) == 12345))
    mask = graph.outputs["mask"]
    if graph.op(mask) != "eq":
        return None, False, False  # the expression folded to a Python constant
    analysis = IntervalAnalysis(graph)
    analysis.run(mask)
    lo, hi = analysis.val[graph.args(mask)[0]]
    if lo is not None:
        graph.outputs["lo"] = lo
    if hi is not None:
        graph.outputs["hi"] = hi
    return rebuild(graph), lo is not None, hi is not None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=int_exprs(), rects=st.lists(small_rectangles, min_size=1, max_size=4))
def test_random_int_expressions_are_bounded(tree, rects):
    graph, has_lo, has_hi = int_bounds(tree)
    if graph is None:
        return
    for b, h, q_lo, q_hi, kv_lo, kv_hi in rects:
        env = {"b": b, "h": h, "q_lo": q_lo, "q_hi": q_hi, "kv_lo": kv_lo, "kv_hi": kv_hi}
        values = [interpret(tree, {"b": b, "h": h, "q": q, "kv": kv})
                  for q in range(q_lo, q_hi + 1) for kv in range(kv_lo, kv_hi + 1)]
        if has_lo:
            assert evaluate(graph, "lo", env) <= min(values), (tree, env)
        if has_hi:
            assert evaluate(graph, "hi", env) >= max(values), (tree, env)
        point = dict(env, q_hi=q_lo, kv_hi=kv_lo)
        value = interpret(tree, {"b": b, "h": h, "q": q_lo, "kv": kv_lo})
        assert (evaluate(graph, "lo", point) if has_lo else value) == value, (tree, point)
        assert (evaluate(graph, "hi", point) if has_hi else value) == value, (tree, point)


Q, KV = ("var", "q"), ("var", "kv")
TIGHT = {  # expressions whose analysed interval is exactly the range of values
    "q-kv": ("sub", Q, KV),
    "q+2kv": ("add", Q, ("mulc", KV, 2)),
    "-3q": ("mulc", Q, -3),
    "q//5": ("fdiv", Q, 5),
    "(q-kv)//-4": ("fdiv", ("sub", Q, KV), -4),
    "min(q,kv)": ("min", Q, KV),
    "max(q,kv)": ("max", Q, KV),
    "abs(q-50)": ("abs", ("sub", Q, ("const", 50))),
    "(q-kv)**2": ("pow", ("sub", Q, KV), 2),
    "(q-40)**3": ("pow", ("sub", Q, ("const", 40)), 3),
    "q*kv": ("mul", Q, KV),
    "(q-30)*(kv-30)": ("mul", ("sub", Q, ("const", 30)), ("sub", KV, ("const", 30))),
    "~q": ("inv", Q),
    "where(b<1,q,kv)": ("where", ("cmp", ("op", "lt"), ("var", "b"), ("const", 1)), Q, KV),
}


@pytest.mark.parametrize("name", sorted(TIGHT))
@settings(max_examples=60, deadline=None)
@given(rect=small_rectangles)
def test_tight_intervals(name, rect):
    tree = TIGHT[name]
    graph, has_lo, has_hi = int_bounds(tree)
    assert has_lo and has_hi
    b, h, q_lo, q_hi, kv_lo, kv_hi = rect
    env = {"b": b, "h": h, "q_lo": q_lo, "q_hi": q_hi, "kv_lo": kv_lo, "kv_hi": kv_hi}
    values = [interpret(tree, {"b": b, "h": h, "q": q, "kv": kv})
              for q in range(q_lo, q_hi + 1) for kv in range(kv_lo, kv_hi + 1)]
    assert (evaluate(graph, "lo", env), evaluate(graph, "hi", env)) == (min(values), max(values))


@pytest.mark.parametrize("c", [7, -7])
def test_mod_intervals(c):
    graph, has_lo, has_hi = int_bounds(("mod", ("sub", Q, KV), c))
    assert has_lo and has_hi
    for q_lo, q_hi, kv_lo, kv_hi in [(10, 12, 0, 0), (10, 20, 0, 0), (-9, -8, 0, 0), (0, 3, 5, 6)]:
        env = {"b": 0, "h": 0, "q_lo": q_lo, "q_hi": q_hi, "kv_lo": kv_lo, "kv_hi": kv_hi}
        values = [(q - kv) % c for q in range(q_lo, q_hi + 1) for kv in range(kv_lo, kv_hi + 1)]
        lo, hi = evaluate(graph, "lo", env), evaluate(graph, "hi", env)
        assert lo <= min(values) and hi >= max(values)
        if (q_lo - kv_hi) // c == (q_hi - kv_lo) // c:
            assert (lo, hi) == (min(values), max(values))
        else:
            assert (lo, hi) == ((0, c - 1) if c > 0 else (c + 1, 0))


def test_unbounded_sides():
    # min(doc[q], q) keeps its upper bound, max keeps its lower bound, abs is >= 0
    assert bounded_sides(lambda b, h, q, kv: torch.minimum(DOC_IDS[q], q)) == (False, True)
    assert bounded_sides(lambda b, h, q, kv: torch.maximum(DOC_IDS[q], q)) == (True, False)
    assert bounded_sides(lambda b, h, q, kv: abs(DOC_IDS[q])) == (True, False)
    assert bounded_sides(lambda b, h, q, kv: DOC_IDS[q] * 2.0) == (False, False)  # floats: all or nothing
    assert bounded_sides(lambda b, h, q, kv: torch.minimum(DOC_IDS[q] * 1.0, q * 1.0)) == (False, False)
    assert bounded_sides(lambda b, h, q, kv: DOC_IDS[b] + q) == (True, True)  # exact per program



def test_equal_bounds_are_shared():
    """``z`` has equal bounds built twice; as one node they decide ``z <= z``, keeping ``where`` bounded."""
    def fn(b, h, q, kv):
        z = q * 0 + 1
        return torch.where(z <= z, kv, DOC_IDS[q])
    assert bounded_sides(fn) == (True, True)

def bounded_sides(fn) -> tuple[bool, bool]:
    """Which sides of ``fn``'s value the analysis bounds."""
    from attngen.ir.passes.intervals import IntervalAnalysis

    graph = trace(None, lambda b, h, q, kv: fn(b, h, q, kv) == 12345)
    analysis = IntervalAnalysis(graph)
    analysis.run(graph.outputs["mask"])
    lo, hi = analysis.val[graph.args(graph.outputs["mask"])[0]]
    return lo is not None, hi is not None
