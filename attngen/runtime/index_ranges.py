"""Captured-tensor reads that a call can bound before any kernel runs.

The kernels evaluate the mods at every position of a call, masked ones too, and read captured
tensors without bound checks (eager torch would raise IndexError, a kernel reads out of bounds).
A read whose index is ``b``, ``h``, ``q_idx`` or ``kv_idx`` itself, or an affine expression of them
(``q_idx - kv_idx + C``, a constant), takes its extreme values at the corners of the call's index
box, so a call can refuse a tensor too small for it. Reads through other expressions (``//``,
``%``, loaded values) are not checked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..ir.evaluate import evaluate_nodes
from ..ir.graph import Graph

INDICES = ("b", "h", "q_idx", "kv_idx")
_AFFINE_OPS = {"input", "const", "add", "sub", "neg", "mul"}


@dataclass(frozen=True, order=True)
class IndexRead:
    """Dimension ``dim`` of captured tensor ``capture`` read at node ``node``: an index itself (``direct``
    names it) or an affine expression of the indices in ``uses``."""
    capture: int
    dim: int
    node: int
    direct: str | None
    uses: tuple[str, ...]


def index_reads(graph: Graph) -> list[IndexRead]:
    """The reads of captured tensors whose range a call can bound."""
    reads = set()
    for _, attrs in graph.nx.nodes(data=True):
        if attrs["op"] != "load":
            continue
        for dim, arg in enumerate(attrs["args"]):
            uses = _affine_in(graph, arg)
            if uses is not None:
                name = graph.input_name(arg)
                reads.add(IndexRead(attrs["capture"], dim, arg, name if name in INDICES else None, uses))
    return sorted(reads)


def _affine_in(graph: Graph, node: int) -> tuple[str, ...] | None:
    """The indices an affine integer expression depends on; None for any other expression."""
    uses = set()
    for n in graph.order([node]):
        op = graph.op(n)
        if op not in _AFFINE_OPS or graph.dtype(n) != "int":
            return None
        if op == "input":
            if graph.input_name(n) not in INDICES:
                return None
            uses.add(graph.input_name(n))
        if op == "mul" and not any(graph.is_const(a) for a in graph.args(n)):
            return None
    return tuple(name for name in INDICES if name in uses)


def check_index_ranges(graph: Graph, reads: list[IndexRead], extents: dict[str, int], skip: set[int]) -> None:
    """Raise ValueError for a read that leaves its captured tensor at some position of a call whose
    indices run over ``range(extents[name])`` (an index missing from ``extents`` is not bounded: reads
    that use it are skipped, as are captures whose ``id`` is in ``skip``)."""
    corners = list(itertools.product(*([0, max(extents.get(name, 1), 1) - 1] for name in INDICES)))
    env = {name: torch.tensor([c[i] for c in corners]) for i, name in enumerate(INDICES)}
    for read in reads:
        tensor = graph.captures[read.capture].tensor
        if id(tensor) in skip or not all(name in extents for name in read.uses):
            continue
        size = tensor.shape[read.dim]
        if read.direct is not None:
            if size < extents[read.direct]:
                raise ValueError(
                    f"captured tensor #{read.capture} of shape {tuple(tensor.shape)} is indexed with {read.direct} in "
                    f"dim {read.dim}, which runs to {extents[read.direct] - 1} in this call, but that dim has {size} "
                    f"entries; give it {extents[read.direct]} (a [1, ...] tensor does not broadcast when indexed)")
            continue
        values = evaluate_nodes(graph, env, [read.node])[read.node]
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= size:
            index = f"an expression of {' and '.join(read.uses)} that runs from {lo} to {hi} in this call" \
                if read.uses else f"the constant {lo}"
            raise ValueError(
                f"captured tensor #{read.capture} of shape {tuple(tensor.shape)} is indexed in dim {read.dim} with "
                f"{index}, but that dim has {size} entries (the kernels evaluate the mods at every position, "
                f"masked ones too, and do not check bounds)")
