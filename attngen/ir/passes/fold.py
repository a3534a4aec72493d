"""Constant folding, and identities that hold for every value, inf and NaN included.

``x * 0`` is not folded (``inf * 0`` is NaN), nor are ``x - x`` and ``x <= x``
for a float ``x``; an identity is only applied when the argument has the
node's dtype (``q_idx * 1.0`` converts to float). ``x != -inf`` is True where
``x`` is finite by how it is built.
"""

from __future__ import annotations

import math

from ..graph import OPS, Graph, copy_node, rebuild, result_dtype

_INT32 = 2**31


def _cast(value, dtype: str):
    """``value`` as the Python type of ``dtype``, or None if it does not fit."""
    if dtype == "float":
        return float(value)
    if dtype == "bool":
        return bool(value) if isinstance(value, bool) else None
    if not isinstance(value, int) or not -_INT32 <= value < _INT32:
        return None  # e.g. 2 ** -1 is not an int; kernels use 32-bit indices
    return int(value)  # min(True, 2) is True


def _evaluate(new: Graph, op: str, dtype: str, args: tuple[int, ...]):
    """The constant value of ``op`` on constant ``args``, or None if unknown."""
    values = [new.node(a)["value"] for a in args]
    if op in ("minimum", "maximum") and any(isinstance(v, float) and math.isnan(v) for v in values):
        return None  # Python's min/max do not propagate NaN like torch does
    if op == "pow" and all(type(v) is int for v in values) and abs(values[1]) > 64:
        return None  # huge exact integer powers are slow and overflow anyway
    try:
        return _cast(OPS[op].evaluate(*values), dtype)
    except (ArithmeticError, ValueError, TypeError):
        return None


# ``x op x`` for an int or bool ``x`` (a float may be NaN: ``nan != nan``, ``inf - inf``).
_SAME_ARGS = {"sub": 0, "lt": False, "le": True, "gt": False, "ge": True, "eq": True, "ne": False}


def _identity(new: Graph, op: str, args: tuple[int, ...]) -> int | None:
    """The argument that ``op(args)`` always equals, if any (dtypes not yet checked)."""
    const = lambda i, v: new.is_const(args[i], v)  # noqa: E731
    if op in ("and", "or", "minimum", "maximum") and args[0] == args[1]:
        return args[0]
    if op == "add":
        return args[0] if const(1, 0) else args[1] if const(0, 0) else None
    if op == "mul":
        return args[0] if const(1, 1) else args[1] if const(0, 1) else None
    if op in ("sub", "truediv", "pow"):
        return args[0] if const(1, 0 if op == "sub" else 1) else None
    if op in ("neg", "not") and new.op(args[0]) == op:
        return new.args(args[0])[0]
    if op == "where" and new.is_const(args[0]):
        return args[1] if new.node(args[0])["value"] else args[2]
    if op == "where" and args[1] == args[2]:
        return args[1]
    if op in ("and", "or") and all(new.dtype(a) == "bool" for a in args):  # 1 & x is not x for ints
        for i in (0, 1):
            if new.is_const(args[i]):  # x & True is x, x & False is False
                return args[1 - i] if const(i, op == "and") else args[i]
    return None


def _not_minus_infinity(graph: Graph, op: str, args: tuple[int, ...]) -> bool | None:
    """True for ``x != -inf`` (either side) where ``x`` is finite by construction (:meth:`Graph.finite`): the
    guard of a key score_mod may drop. Other comparisons with infinities (``torch.isinf``, ``nan_to_num``) stay
    as written."""
    if op != "ne":
        return None
    for x, other in (args, args[::-1]):
        if graph.is_const(other, -math.inf) and graph.finite(x):
            return True
    return None


def fold_node(graph: Graph, op: str, args: tuple[int, ...], dtype: str | None = None) -> int:
    """``op(args)`` appended to ``graph``, unless it is a constant or equals an argument."""
    dtype = dtype or result_dtype(op, (graph.dtype(a) for a in args))
    if all(graph.is_const(a) for a in args):
        value = _evaluate(graph, op, dtype, args)
    else:
        same_args = op in _SAME_ARGS and args[0] == args[1] and graph.dtype(args[0]) != "float"
        value = _SAME_ARGS[op] if same_args else _not_minus_infinity(graph, op, args)
    if value is not None:
        return graph.add("const", (), dtype, value=value)
    same = _identity(graph, op, args)
    if same is not None and graph.dtype(same) == dtype:
        return same
    return graph.add(op, args, dtype)


def _fold(new: Graph, old: Graph, n: int, new_args: tuple[int, ...]) -> int:
    if OPS[old.op(n)].evaluate is None:  # inputs, constants, loads
        return copy_node(new, old, n, new_args)
    return fold_node(new, old.op(n), new_args, old.dtype(n))


def fold_constants(graph: Graph) -> Graph:
    """Evaluate constant subexpressions and drop identity operations."""
    return rebuild(graph, _fold)
