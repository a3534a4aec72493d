"""Captured-tensor reads that a call can bound before any kernel runs.

The kernels evaluate the mods at every position of a call, masked ones too, and read captured
tensors without bound checks (eager torch would raise IndexError, a kernel reads out of bounds).
A read is checked when its index has exact extremes over the call's index box that a few integer
operations find:

* an affine expression of ``b``, ``h``, ``q_idx``, ``kv_idx`` and constants (``q_idx - kv_idx + C``):
  its extremes are at the corners of the box; its offset and coefficients are found once, when the
  spec compiles;
* ``//`` and ``%`` by a positive constant, ``torch.clamp`` / ``minimum`` / ``maximum``, sums and
  constant multiples of such expressions, as long as the parts combined use different indices
  (``bias[h, torch.clamp(q_idx - kv_idx, -64, 63) + 64]``, ``table[q_idx // 16, kv_idx // 16]``)
  and ``%`` takes an expression that runs through consecutive values: interval arithmetic is exact
  on them, so a call refuses only reads that do leave the tensor;
* any expression of the indices that depends on them through one affine expression taking every
  integer between its extremes (T5's buckets of ``kv_idx - q_idx``, through ``where``, ``log`` and
  conversions): its value is tried at each of them (up to 4M, with torch, float ops rounded to float32
  as the kernels round them), once per call shape;
* values read from an integer captured tensor at indices of the kinds above that each take every
  integer between their extremes and share no index (``bias[h, buckets[q_idx, kv_idx]]``,
  ``doc_bias[doc_ids[b, q_idx]]``): the reads cover a box of that tensor, whose least and greatest
  values a call reads (one device sync, then kept with the tensor while its version counter holds).

The bounds are plain Python arithmetic on nested tuples (no graph at call time), which torch.compile
traces without a break (functions of one expression and loaded values are not found inside a trace).
Other indices (parts of several expressions sharing an index, the score) are not checked. A call checks
the reads with :func:`attngen.index_checks.check_index_ranges` (torch alone: exported modules do too).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..index_checks import BY_CONSTANT, INDICES, index_names
from ..ir.evaluate import evaluate_nodes
from ..ir.graph import OPS, Graph

_AFFINE_OPS = {"input", "const", "add", "sub", "neg", "mul"}
_OF_TWO = ("add", "sub", "minimum", "maximum")  # two expressions on different indices


class IndexRead(NamedTuple):
    """Dimension ``dim`` of captured tensor ``capture`` read at the index ``bounds`` describes (see
    :func:`~attngen.index_checks.index_range`); ``direct`` names the index when the read is at the index
    itself. A tuple, as :func:`~attngen.index_checks.check_index_ranges` takes it."""
    capture: int
    dim: int
    bounds: tuple
    direct: str | None


def index_reads(graph: Graph) -> list[IndexRead]:
    """The reads of captured tensors whose index range a call can find exactly."""
    reads = []
    for _, attrs in graph.nx.nodes(data=True):
        if attrs["op"] != "load":
            continue
        for dim, arg in enumerate(attrs["args"]):
            bounds = _bounds(graph, arg) or _function_of_one(graph, arg)
            if bounds is not None:
                name = graph.input_name(arg)
                reads.append(IndexRead(attrs["capture"], dim, bounds, name if name in INDICES else None))
    return sorted(set(reads), key=lambda r: (r.capture, r.dim, repr(r.bounds)))


def _bounds(graph: Graph, node: int) -> tuple | None:
    """``node`` as a tree of ``("affine", offset, coefficients)`` leaves, ``(op, tree, constant)`` for
    ``BY_CONSTANT`` and ``(op, tree, tree)`` for ``_OF_TWO``, or None where its extremes are not exact."""
    if graph.dtype(node) != "int":
        return None
    if _affine(graph, node):
        return _affine_signature(graph, node)
    op, args = graph.op(node), graph.args(node)
    if op == "load":
        return _load_bounds(graph, node)
    if op == "mul" and graph.is_const(args[0]):
        args = args[::-1]
    if op in BY_CONSTANT and graph.is_const(args[1]):
        constant, inner = graph.node(args[1])["value"], _bounds(graph, args[0])
        if inner is None or not isinstance(constant, int) or (op != "mul" and constant <= 0):
            return None
        if op == "mod" and not _dense(inner):
            return None  # (2 * h) % 2 is 0 only: a remainder's extremes are exact on consecutive values
        return op, inner, constant
    if op in _OF_TWO:
        parts = [_bounds(graph, a) for a in args]
        if None in parts or index_names(parts[0]) & index_names(parts[1]):
            return None  # extremes of parts sharing an index need not be reached together
        return op, *parts
    return None


def _load_bounds(graph: Graph, node: int) -> tuple | None:
    """``("load", capture, parts)`` for an integer captured tensor read at indices that each take every
    integer between their extremes and share no index: the values it reads are those of one box."""
    parts = tuple(_bounds(graph, a) for a in graph.args(node))
    if None in parts or not all(_dense(p) for p in parts):
        return None
    used = [index_names(p) for p in parts]
    if sum(map(len, used)) != len(set().union(*used)):
        return None
    return "load", graph.node(node)["capture"], parts


def _affine_signature(graph: Graph, node: int) -> tuple:
    """``("affine", offset, coefficients)`` of an affine integer expression of the indices."""
    # the origin, then each index at 1 with the others at 0: the expression's offset and slopes
    points = {name: torch.tensor([0] + [int(i == j) for j in range(len(INDICES))]) for i, name in enumerate(INDICES)}
    values = [int(x) for x in evaluate_nodes(graph, points, [node])[node].expand(len(INDICES) + 1)]
    return "affine", values[0], tuple(x - values[0] for x in values[1:])


def _function_of_one(graph: Graph, node: int) -> tuple | None:
    """``("function", inner, steps)`` where ``node`` depends on the indices only through one affine
    expression ``inner`` that takes every integer between its extremes (coefficients -1, 0, 1; e.g. T5's
    buckets of ``kv_idx - q_idx``, through ``where``, ``log`` and conversions): ``steps`` compute it
    from ``inner``'s value, so a call can try every value. None for anything else (loads, the score)."""
    order = graph.order([node])
    affine = {n for n in order if _affine(graph, n)}
    within = set(order)
    steps, position, inner = [], {}, None
    for n in order:
        op = graph.op(n)
        if op == "const":
            steps.append(("const", graph.node(n)["value"]))
        elif n in affine:
            if all(c in affine for c in graph.nx.successors(n) if c in within):
                continue  # inside a larger affine expression
            signature = _affine_signature(graph, n)
            if any(signature[2]):
                if inner not in (None, signature) or not all(c in (-1, 0, 1) for c in signature[2]):
                    return None
                inner = signature
                steps.append(("inner",))
            else:
                steps.append(("const", signature[1]))
        elif OPS[op].evaluate is None:
            return None  # the score, a load
        else:
            steps.append((op, graph.dtype(n), tuple(position[a] for a in graph.args(n))))
        position[n] = len(steps) - 1
    return None if inner is None else ("function", inner, tuple(steps))


def _affine(graph: Graph, node: int) -> bool:
    """Whether ``node`` is an integer expression of the indices and constants by + - and constant factors."""
    for n in graph.order([node]):
        op = graph.op(n)
        if op not in _AFFINE_OPS or graph.dtype(n) != "int":
            return False
        if op == "input" and graph.input_name(n) not in INDICES:
            return False
        if op == "mul" and not any(graph.is_const(a) for a in graph.args(n)):
            return False
    return True


def _dense(bounds: tuple) -> bool:
    """Whether the expression takes every integer between its extremes (in any box of indices)."""
    op = bounds[0]
    if op == "affine":
        return all(c in (-1, 0, 1) for c in bounds[2])
    if op in ("mod", "load"):
        return False
    if op in BY_CONSTANT:
        return _dense(bounds[1]) and (op == "floordiv" or bounds[2] in (-1, 1))
    return _dense(bounds[1]) and _dense(bounds[2])  # parts on different indices: sums, minima, maxima
