"""Captured-tensor reads that a call can bound before any kernel runs.

The kernels evaluate the mods at every position of a call, masked ones too, and read captured
tensors without bound checks (eager torch would raise IndexError, a kernel reads out of bounds).
A read whose index is ``b``, ``h``, ``q_idx`` or ``kv_idx`` itself, or an affine expression of them
(``q_idx - kv_idx + C``, a constant), has its extremes at the corners of the call's index box: its
coefficients are found once, when the spec compiles, so a call checks it with a few integer
operations (which torch.compile traces without a break). Reads through other expressions (``//``,
``%``, loaded values) are not checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.evaluate import evaluate_nodes
from ..ir.graph import Graph

INDICES = ("b", "h", "q_idx", "kv_idx")
_AFFINE_OPS = {"input", "const", "add", "sub", "neg", "mul"}


@dataclass(frozen=True)
class IndexRead:
    """Dimension ``dim`` of captured tensor ``capture`` read at ``offset + sum(coefficients * indices)``
    (indices in the order of INDICES); ``direct`` names the index when the read is at the index itself."""
    capture: int
    dim: int
    offset: int
    coefficients: tuple[int, ...]
    direct: str | None


def index_reads(graph: Graph) -> list[IndexRead]:
    """The reads of captured tensors at affine expressions of the indices, with their coefficients."""
    reads = []
    # the origin, then each index at 1 with the others at 0: an affine expression's offset and slopes
    points = {name: torch.tensor([0] + [int(i == j) for j in range(len(INDICES))]) for i, name in enumerate(INDICES)}
    for _, attrs in graph.nx.nodes(data=True):
        if attrs["op"] != "load":
            continue
        for dim, arg in enumerate(attrs["args"]):
            if not _affine(graph, arg):
                continue
            values = [int(x) for x in evaluate_nodes(graph, points, [arg])[arg].expand(len(INDICES) + 1)]
            name = graph.input_name(arg)
            reads.append(IndexRead(attrs["capture"], dim, values[0], tuple(x - values[0] for x in values[1:]),
                                   name if name in INDICES else None))
    return sorted(set(reads), key=lambda r: (r.capture, r.dim, r.offset, r.coefficients))


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


def check_index_ranges(graph: Graph, reads: list[IndexRead], extents: dict[str, int], skip: set[int]) -> None:
    """Raise ValueError for a read that leaves its captured tensor at some position of a call whose
    indices run over ``range(extents[name])``. Reads that use an index missing from ``extents`` (not
    bounded: positions in a KV cache or in packed sequences) are skipped, as are empty calls and the
    captures whose ``id`` is in ``skip``."""
    for read in reads:
        used = [(c, name) for c, name in zip(read.coefficients, INDICES) if c]
        tensor = graph.captures[read.capture].tensor
        if id(tensor) in skip or any(name not in extents or extents[name] == 0 for _, name in used):
            continue
        size = tensor.shape[read.dim]
        if read.direct is not None:
            if size < extents[read.direct]:
                raise ValueError(
                    f"captured tensor #{read.capture} of shape {tuple(tensor.shape)} is indexed with {read.direct} in "
                    f"dim {read.dim}, which runs to {extents[read.direct] - 1} in this call, but that dim has {size} "
                    f"entries; give it {extents[read.direct]} (a [1, ...] tensor does not broadcast when indexed)")
            continue
        lo = read.offset + sum(min(0, c * (extents[name] - 1)) for c, name in used)
        hi = read.offset + sum(max(0, c * (extents[name] - 1)) for c, name in used)
        if lo < 0 or hi >= size:
            index = f"an expression of {' and '.join(name for _, name in used)} that runs from {lo} to {hi} in " \
                    f"this call" if used else f"the constant {lo}"
            raise ValueError(
                f"captured tensor #{read.capture} of shape {tuple(tensor.shape)} is indexed in dim {read.dim} with "
                f"{index}, but that dim has {size} entries (the kernels evaluate the mods at every position, "
                f"masked ones too, and do not check bounds)")
