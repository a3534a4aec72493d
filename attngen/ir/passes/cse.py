"""Common-subexpression elimination: merge structurally identical nodes."""

from __future__ import annotations

from ..graph import Graph, copy_node, rebuild

# Ops whose result is exactly the same with their two arguments swapped.
COMMUTATIVE = frozenset({"add", "mul", "eq", "ne", "and", "or", "xor"})


def _key(old: Graph, n: int, new_args: tuple[int, ...]) -> tuple:
    """What makes two nodes interchangeable: op, arguments, dtype and attributes."""
    attrs = old.node(n)
    op = attrs["op"]
    args = tuple(sorted(new_args)) if op in COMMUTATIVE else new_args
    # repr tells 30 from 30.0, 0.0 from -0.0 and makes NaN equal to itself.
    value = (type(attrs["value"]).__name__, repr(attrs["value"])) if op == "const" else None
    return op, args, attrs["dtype"], value, attrs.get("name"), attrs.get("capture"), attrs.get("tile")


def cse(graph: Graph) -> Graph:
    """A copy of ``graph`` in which each distinct computation appears once."""
    seen: dict[tuple, int] = {}

    def rewrite(new: Graph, old: Graph, n: int, new_args: tuple[int, ...]) -> int:
        key = _key(old, n, new_args)
        if key not in seen:
            seen[key] = copy_node(new, old, n, new_args)
        return seen[key]

    return rebuild(graph, rewrite)
