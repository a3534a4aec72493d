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
  on them, so a call refuses only reads that do leave the tensor.

The bounds are plain Python integer arithmetic on nested tuples (no graph at call time), which
torch.compile traces without a break. Other indices (parts sharing an index, ``where``, loaded
values) are not checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.evaluate import evaluate_nodes
from ..ir.graph import Graph

INDICES = ("b", "h", "q_idx", "kv_idx")
_AFFINE_OPS = {"input", "const", "add", "sub", "neg", "mul"}
_BY_CONSTANT = ("floordiv", "mod", "mul")  # an expression and a constant
_OF_TWO = ("add", "sub", "minimum", "maximum")  # two expressions on different indices


@dataclass(frozen=True)
class IndexRead:
    """Dimension ``dim`` of captured tensor ``capture`` read at the index ``bounds`` describes (see
    :func:`index_range`); ``direct`` names the index when the read is at the index itself."""
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
            bounds = _bounds(graph, arg)
            if bounds is not None:
                name = graph.input_name(arg)
                reads.append(IndexRead(attrs["capture"], dim, bounds, name if name in INDICES else None))
    return sorted(set(reads), key=lambda r: (r.capture, r.dim, repr(r.bounds)))


def _bounds(graph: Graph, node: int) -> tuple | None:
    """``node`` as a tree of ``("affine", offset, coefficients)`` leaves, ``(op, tree, constant)`` for
    ``_BY_CONSTANT`` and ``(op, tree, tree)`` for ``_OF_TWO``, or None where its extremes are not exact."""
    if graph.dtype(node) != "int":
        return None
    if _affine(graph, node):
        # the origin, then each index at 1 with the others at 0: the expression's offset and slopes
        points = {name: torch.tensor([0] + [int(i == j) for j in range(len(INDICES))])
                  for i, name in enumerate(INDICES)}
        values = [int(x) for x in evaluate_nodes(graph, points, [node])[node].expand(len(INDICES) + 1)]
        return "affine", values[0], tuple(x - values[0] for x in values[1:])
    op, args = graph.op(node), graph.args(node)
    if op == "mul" and graph.is_const(args[0]):
        args = args[::-1]
    if op in _BY_CONSTANT and graph.is_const(args[1]):
        constant, inner = graph.node(args[1])["value"], _bounds(graph, args[0])
        if inner is None or not isinstance(constant, int) or (op != "mul" and constant <= 0):
            return None
        if op == "mod" and not _dense(inner):
            return None  # (2 * h) % 2 is 0 only: a remainder's extremes are exact on consecutive values
        return op, inner, constant
    if op in _OF_TWO:
        parts = [_bounds(graph, a) for a in args]
        if None in parts or _indices(parts[0]) & _indices(parts[1]):
            return None  # extremes of parts sharing an index need not be reached together
        return op, *parts
    return None


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


def _indices(bounds: tuple) -> set[str]:
    """The indices an expression depends on."""
    if bounds[0] == "affine":
        return {name for c, name in zip(bounds[2], INDICES) if c}
    if bounds[0] in _BY_CONSTANT:
        return _indices(bounds[1])
    return _indices(bounds[1]) | _indices(bounds[2])


def _dense(bounds: tuple) -> bool:
    """Whether the expression takes every integer between its extremes (in any box of indices)."""
    op = bounds[0]
    if op == "affine":
        return all(c in (-1, 0, 1) for c in bounds[2])
    if op == "mod":
        return False
    if op in _BY_CONSTANT:
        return _dense(bounds[1]) and (op == "floordiv" or bounds[2] in (-1, 1))
    return _dense(bounds[1]) and _dense(bounds[2])  # parts on different indices: sums, minima, maxima


def index_range(bounds: tuple, extents: dict[str, int]) -> tuple[int, int]:
    """The least and the greatest value of the expression while each index runs over ``range(extents[name])``."""
    op = bounds[0]
    if op == "affine":
        _, offset, coefficients = bounds
        used = [(c, extents[name] - 1) for c, name in zip(coefficients, INDICES) if c]
        return offset + sum(min(0, c * last) for c, last in used), offset + sum(max(0, c * last) for c, last in used)
    lo, hi = index_range(bounds[1], extents)
    if op in _BY_CONSTANT:
        c = bounds[2]
        if op == "mul":
            return min(lo * c, hi * c), max(lo * c, hi * c)
        if op == "floordiv":
            return lo // c, hi // c
        if lo // c != hi // c:  # the values pass a multiple of c: c - 1, then 0 are reached
            return 0, c - 1
        return lo % c, hi % c
    lo2, hi2 = index_range(bounds[2], extents)
    if op == "add":
        return lo + lo2, hi + hi2
    if op == "sub":
        return lo - hi2, hi - lo2
    if op == "minimum":
        return min(lo, lo2), min(hi, hi2)
    return max(lo, lo2), max(hi, hi2)


def check_index_ranges(graph: Graph, reads: list[IndexRead], extents: dict[str, int], skip: set[int]) -> None:
    """Raise ValueError for a read that leaves its captured tensor at some position of a call whose
    indices run over ``range(extents[name])``. Reads that use an index missing from ``extents`` (not
    bounded: positions in a KV cache or in packed sequences) are skipped, as are empty calls and the
    captures whose ``id`` is in ``skip``."""
    for read in reads:
        used = [name for name in INDICES if name in _indices(read.bounds)]
        tensor = graph.captures[read.capture].tensor
        if id(tensor) in skip or any(name not in extents or extents[name] == 0 for name in used):
            continue
        size = tensor.shape[read.dim]
        if read.direct is not None:
            if size < extents[read.direct]:
                raise ValueError(
                    f"captured tensor #{read.capture} of shape {tuple(tensor.shape)} is indexed with {read.direct} in "
                    f"dim {read.dim}, which runs to {extents[read.direct] - 1} in this call, but that dim has {size} "
                    f"entries; give it {extents[read.direct]} (a [1, ...] tensor does not broadcast when indexed)")
            continue
        lo, hi = index_range(read.bounds, extents)
        if lo < 0 or hi >= size:
            index = f"an expression of {' and '.join(used)} that runs from {lo} to {hi} in this call" if used \
                else f"the constant {lo}"
            raise ValueError(
                f"captured tensor #{read.capture} of shape {tuple(tensor.shape)} is indexed in dim {read.dim} with "
                f"{index}, but that dim has {size} entries (the kernels evaluate the mods at every position, "
                f"masked ones too, and do not check bounds)")
