"""Graph-to-graph passes over the IR."""

from ..graph import Graph
from .autodiff import differentiate
from .cse import cse
from .fold import fold_constants
from .simplify import simplify


def optimize(graph: Graph) -> Graph:
    """The standard pipeline: fold, differentiate the score, simplify, fold, CSE."""
    return cse(fold_constants(simplify(differentiate(fold_constants(graph)))))


__all__ = ["cse", "differentiate", "fold_constants", "optimize", "simplify"]
