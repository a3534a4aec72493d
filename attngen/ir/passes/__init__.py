"""Graph-to-graph passes over the IR."""

from ..graph import Graph
from .autodiff import differentiate
from .cse import cse
from .fold import fold_constants
from .intervals import block_bounds
from .simplify import simplify


def optimize(graph: Graph) -> Graph:
    """The standard pipeline: fold, differentiate, simplify, fold, CSE.

    Differentiates ``score`` with respect to the input ``score``, and each row
    expectation ``exp<e>`` with respect to the input ``logit`` (outputs
    prefixed ``exp<e>.``).
    """
    graph = differentiate(fold_constants(graph))
    e = 0
    while f"exp{e}" in graph.outputs:
        graph = differentiate(graph, f"exp{e}", wrt="logit", prefix=f"exp{e}.")
        e += 1
    return cse(fold_constants(simplify(graph)))


__all__ = ["block_bounds", "cse", "differentiate", "fold_constants", "optimize", "simplify"]
