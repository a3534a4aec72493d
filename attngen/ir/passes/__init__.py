"""Graph-to-graph passes over the IR."""

from ..graph import Graph, copy_node, rebuild
from .autodiff import differentiate
from .cse import cse
from .fold import fold_constants, fold_node
from .intervals import block_bounds
from .ranges import loop_segments
from .simplify import simplify


def optimize(graph: Graph) -> Graph:
    """The standard pipeline: fold, differentiate, simplify, fold, CSE.

    Differentiates ``score`` (and ``score2`` and ``logit``, outputs prefixed ``score2.`` and ``logit.``)
    with respect to the input ``score``, and each row
    expectation ``exp<e>`` with respect to the input ``logit`` (outputs
    prefixed ``exp<e>.``).
    """
    graph = differentiate(fold_constants(graph))
    if "score2" in graph.outputs:  # differential attention's second stream
        graph = differentiate(graph, "score2", prefix="score2.")
    if "logit" in graph.outputs:  # the weight families' logit, for the gradients of its max and expectations
        graph = differentiate(graph, "logit", prefix="logit.")
    e = 0
    while f"exp{e}" in graph.outputs:
        graph = differentiate(graph, f"exp{e}", wrt="logit", prefix=f"exp{e}.")
        e += 1
    return cse(fold_constants(simplify(graph)))


def mask_plan(graph: Graph) -> Graph:
    """The block-sparsity plan the kernels follow: ``block_live``/``block_full`` per tile (which may
    read per-tile summaries of captured tensors), ``block_partial = ~block_full`` and the loop
    segments of :func:`loop_segments`; unused tile summaries are dropped."""
    graph = loop_segments(block_bounds(graph, tiles=True))
    graph.outputs["block_partial"] = fold_node(graph, "not", (graph.outputs["block_full"],))
    used = sorted({graph.node(n)["tile"] for n in graph.order() if graph.op(n) == "tile"})
    renumber = {old: new for new, old in enumerate(used)}

    def keep_used(new: Graph, old: Graph, n: int, args: tuple[int, ...]) -> int:
        if old.op(n) == "tile":
            return new.add("tile", args, old.dtype(n), tile=renumber[old.node(n)["tile"]])
        return copy_node(new, old, n, args)
    pruned = rebuild(graph, keep_used)
    pruned.tiles = [graph.tiles[i] for i in used]
    return pruned


__all__ = ["block_bounds", "cse", "differentiate", "fold_constants", "loop_segments", "mask_plan", "optimize",
           "simplify"]
