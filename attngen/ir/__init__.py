"""The intermediate representation: a typed op graph and the passes over it."""

from .graph import Capture, Graph

__all__ = ["Capture", "Graph"]
