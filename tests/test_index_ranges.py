"""The index ranges a call checks captured-tensor reads against: exact, or not claimed at all."""

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attngen as ag
from attngen.runtime.index_ranges import INDICES, index_range, index_reads
from attngen.trace import trace

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
        assert index_range(read.bounds, EXTENTS) == (values.min().item(), values.max().item())
