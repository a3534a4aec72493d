"""The index ranges a call checks captured-tensor reads against: exact, or not claimed at all."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attngen as ag
from attngen.index_checks import INDICES, captured_values, read_range
from attngen.runtime.index_ranges import index_reads
from attngen.trace import trace

from variants import T5_BUCKET

EXTENTS = {"b": 2, "h": 3, "q_idx": 13, "kv_idx": 21}
_GRID = dict(zip(INDICES, torch.meshgrid(*(torch.arange(n) for n in EXTENTS.values()), indexing="ij")))


def _node(children):
    return st.one_of(
        st.tuples(st.sampled_from(["+", "-", "min", "max"]), children, children),
        st.tuples(st.sampled_from(["*", "+c"]), children, st.integers(-9, 9)),
        st.tuples(st.sampled_from(["//", "%"]), children, st.integers(1, 7)),
        st.tuples(st.just("clamp"), children, st.integers(-9, 0), st.integers(0, 9)),
    )


# integer expressions of the indices (each subexpression uses at least one)
EXPRESSIONS = st.recursive(st.sampled_from(INDICES).map(lambda name: ("index", name)), _node, max_leaves=6)


def _evaluate(tree, env):
    """The expression on traced indices or on the grid of every index."""
    op, *args = tree
    if op == "index":
        return env[args[0]]
    if op == "clamp":
        return torch.clamp(_evaluate(args[0], env), min=args[1], max=args[2])
    x = _evaluate(args[0], env)
    y = _evaluate(args[1], env) if isinstance(args[1], tuple) else args[1]
    if op in ("min", "max"):
        return (torch.minimum if op == "min" else torch.maximum)(x, y)
    if op in ("+", "+c"):
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x // y if op == "//" else x % y


def _indices(tree) -> list[str]:
    op, *args = tree
    if op == "index":
        return [args[0]]
    return [name for a in args if isinstance(a, tuple) for name in _indices(a)]


@settings(max_examples=150)
@given(EXPRESSIONS)
@example(("clamp", ("-", ("index", "q_idx"), ("index", "kv_idx")), -4, 6))
@example(("%", ("*", ("index", "b"), 2), 2))  # 0 only: not checked
@example(("min", ("index", "q_idx"), ("-", ("index", "kv_idx"), ("index", "q_idx"))))  # shared index: not checked
def test_a_checked_range_is_exact(tree):
    """Where a read is checked, its range is the least and the greatest index over the whole call (so a
    call is refused only when some position does read outside the tensor); an expression that uses each
    index once is always checked."""
    table = torch.zeros(1)
    graph = trace(lambda s, b, h, q_idx, kv_idx: s + table[_evaluate(tree, dict(zip(INDICES, (b, h, q_idx, kv_idx))))],
                  None, ag.norms.Softmax())
    reads = index_reads(graph)
    values = torch.as_tensor(_evaluate(tree, _GRID)).expand(*EXTENTS.values())
    used = _indices(tree)
    if len(used) == len(set(used)) and "%" not in repr(tree):
        assert len(reads) == 1
    for read in reads:
        assert read_range(read.bounds, EXTENTS) == (values.min().item(), values.max().item())


@settings(max_examples=80)
@given(EXPRESSIONS, EXPRESSIONS, st.integers(0, 2**31 - 1), st.sampled_from(["alone", "plus_h", "min_kv"]))
@example(("index", "q_idx"), ("-", ("index", "kv_idx"), ("index", "b")), 0, "plus_h")
@example(("index", "q_idx"), ("index", "q_idx"), 0, "alone")  # the parts share q_idx: not checked
def test_a_range_through_loaded_values_is_exact(first, second, seed, combine):
    """A read at the values of an integer table (itself read at two expressions): where checked, its range
    is the least and the greatest index over the whole call; a table read at parts that use each index
    once, no index in both, and take every integer between their extremes is always checked."""
    ranges = [(int(e.min()), int(e.max())) for e in (torch.as_tensor(_evaluate(t, _GRID)) for t in (first, second))]
    values = torch.randint(-50, 50, tuple(hi - lo + 1 for lo, hi in ranges), generator=torch.Generator().manual_seed(seed))
    outer = torch.zeros(1)

    def index(env):
        loaded = values[_evaluate(first, env) - ranges[0][0], _evaluate(second, env) - ranges[1][0]]
        return {"alone": loaded, "plus_h": loaded + env["h"], "min_kv": torch.minimum(loaded, env["kv_idx"])}[combine]
    graph = trace(lambda s, b, h, q_idx, kv_idx: s + outer[index(dict(zip(INDICES, (b, h, q_idx, kv_idx))))],
                  None, ag.norms.Softmax())
    reads = [read for read in index_reads(graph) if graph.captures[read.capture].tensor is outer]
    expected = index(_GRID).expand(*EXTENTS.values())
    used = _indices(first) + _indices(second) + {"alone": [], "plus_h": ["h"], "min_kv": ["kv_idx"]}[combine]
    simple = all("%" not in repr(t) and "*" not in repr(t) for t in (first, second))
    if len(used) == len(set(used)) and simple:
        assert len(reads) == 1
    for read in reads:
        assert read_range(read.bounds, EXTENTS, captured_values([c.tensor for c in graph.captures])) == \
            (expected.min().item(), expected.max().item())


@pytest.mark.parametrize("q_len, kv_len", [(13, 21), (300, 40), (50000, 70000)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_a_function_of_one_offset_is_tried_at_each_value(q_len, kv_len, bidirectional):
    """T5's buckets of kv_idx - q_idx go through where, log and conversions: the read is a function of one
    offset, tried at each of its values (floats rounded to float32 as the kernels round them), at lengths
    of 64k and more too (120k offsets, tried at once with torch)."""
    table = torch.zeros(1, 32)
    graph = trace(lambda s, b, h, q_idx, kv_idx: s + table[h, T5_BUCKET(kv_idx - q_idx, bidirectional)],
                  None, ag.norms.Softmax())
    reads = {read.dim: read for read in index_reads(graph)}
    assert reads[1].bounds[0] == "function"
    buckets = T5_BUCKET(torch.arange(1 - q_len, kv_len), bidirectional)  # at every offset kv_idx - q_idx
    extents = {"b": 1, "h": 1, "q_idx": q_len, "kv_idx": kv_len}
    assert read_range(reads[1].bounds, extents) == (buckets.min().item(), buckets.max().item())


def test_a_function_undefined_somewhere_is_not_checked():
    """log(0) converted to an int has no value: where it is selected the call cannot bound the read."""
    table = torch.zeros(64)
    graph = trace(lambda s, b, h, q_idx, kv_idx: s + table[torch.log((q_idx - kv_idx).float() + 1.0).long()],
                  None, ag.norms.Softmax())
    read, = index_reads(graph)
    assert read.bounds[0] == "function"
    assert read_range(read.bounds, {"b": 1, "h": 1, "q_idx": 8, "kv_idx": 8}) is None  # log(-6) is NaN
    assert read_range(read.bounds, {"b": 1, "h": 1, "q_idx": 8, "kv_idx": 1}) == (0, 2)  # log(1..8)
