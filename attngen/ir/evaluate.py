"""A reference interpreter: evaluate IR outputs with torch ops on broadcastable tensors.

Floats are computed in float64, ints in int64; ``//`` and ``%`` round toward
negative infinity like Python and torch. Meant for tests and debugging.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from ..index_checks import TORCH_OPS, TORCH_TYPES
from .graph import Graph


def evaluate_nodes(graph: Graph, env: Mapping[str, torch.Tensor], roots: Iterable[int] | None = None,
                   tiles: Sequence[torch.Tensor] = (), captures: Sequence[torch.Tensor] | None = None
                   ) -> dict[int, torch.Tensor]:
    """The value of every node that ``roots`` (default: all outputs) depend on; ``tiles`` are the
    summary tensors of ``graph.tiles`` (see TileSummary), ``captures`` replace the graph's captured
    tensors (default: the graph's own)."""
    captures = [c.tensor for c in graph.captures] if captures is None else captures
    values: dict[int, torch.Tensor] = {}
    for n in graph.order(roots):
        attrs, args = graph.node(n), [values[a] for a in graph.args(n)]
        op, dtype = attrs["op"], TORCH_TYPES[attrs["dtype"]]
        if op == "input":
            value = torch.as_tensor(env[attrs["name"]])
        elif op == "const":
            value = torch.tensor(attrs["value"], dtype=dtype)
        elif op == "load":
            value = captures[attrs["capture"]].detach()[tuple(a.long() for a in args)]
        elif op == "tile":
            value = tiles[attrs["tile"]][tuple(a.long() for a in args)]
        elif op == "where":
            value = torch.where(args[0].bool(), args[1].to(dtype), args[2].to(dtype))
        elif op in ("lt", "le", "gt", "ge", "eq", "ne"):
            value = TORCH_OPS[op](*args)
        else:  # arithmetic and logic: compute in the result's type
            value = TORCH_OPS[op](*(a.to(dtype) for a in args))
        values[n] = value.to(dtype)
    return values


def evaluate(graph: Graph, name: str, env: Mapping[str, torch.Tensor], tiles: Sequence[torch.Tensor] = (),
             captures: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The value of output ``name``, with inputs (``score``, ``q_idx``, ...) taken from ``env``."""
    node = graph.outputs[name]
    return evaluate_nodes(graph, env, [node], tiles, captures)[node]

