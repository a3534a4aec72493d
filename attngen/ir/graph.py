"""The IR: a DAG of typed scalar ops stored in a ``networkx.DiGraph``.

Every node computes one value per (q_idx, kv_idx) position of an attention
tile. A node's attributes are:

``op``     one of :data:`OPS` (``"input"``, ``"const"``, ``"load"``, ``"add"``, ...)
``args``   ordered tuple of argument node ids (edges mirror it for networkx)
``dtype``  ``"float"``, ``"int"`` or ``"bool"``
``value``  the Python value of a ``"const"``
``name``   the name of an ``"input"`` (``score``, ``b``, ``h``, ``q_idx``, ``kv_idx``, ...)
``capture`` the index into :attr:`Graph.captures` of a ``"load"``
``tile``   the index into :attr:`Graph.tiles` of a ``"tile"`` (a per-tile summary)

Named results (``score``, ``mask``, gradients, ...) live in
:attr:`Graph.outputs`.
"""

from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass
from typing import Callable, Iterable

import networkx as nx
import torch


def _floordiv(a, b):
    return math.floor(a / b) if isinstance(a, float) or isinstance(b, float) else a // b


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _expm1(x):
    try:
        return math.expm1(x)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class Op:
    """Static facts about an op: arity, result type rule, Python evaluator."""

    arity: int
    result: str  # "arith" (float if any float arg else int), "float", "int", "bool", "logic", "select"
    evaluate: Callable | None = None


OPS: dict[str, Op] = {
    "input": Op(0, "leaf"),
    "const": Op(0, "leaf"),
    "load": Op(-1, "leaf"),  # variable arity: one index per dimension
    "tile": Op(-1, "leaf"),  # a load from a per-tile summary of a capture (see TileSummary)
    "add": Op(2, "arith", operator.add),
    "sub": Op(2, "arith", operator.sub),
    "mul": Op(2, "arith", operator.mul),
    "truediv": Op(2, "float", operator.truediv),
    "floordiv": Op(2, "arith", _floordiv),
    "mod": Op(2, "arith", operator.mod),
    "pow": Op(2, "arith", operator.pow),
    "minimum": Op(2, "arith", min),
    "maximum": Op(2, "arith", max),
    "neg": Op(1, "arith", operator.neg),
    "abs": Op(1, "arith", abs),
    "exp": Op(1, "float", math.exp),
    "log": Op(1, "float", lambda x: math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan)),
    "tanh": Op(1, "float", math.tanh),
    "sigmoid": Op(1, "float", _sigmoid),
    "sqrt": Op(1, "float", lambda x: math.sqrt(x) if x >= 0 else math.nan),
    "cos": Op(1, "float", math.cos),
    "sin": Op(1, "float", math.sin),
    "erf": Op(1, "float", math.erf),
    "atan": Op(1, "float", math.atan),
    "log1p": Op(1, "float", lambda x: math.log1p(x) if x > -1 else (-math.inf if x == -1 else math.nan)),
    "expm1": Op(1, "float", _expm1),
    "lt": Op(2, "bool", operator.lt),
    "le": Op(2, "bool", operator.le),
    "gt": Op(2, "bool", operator.gt),
    "ge": Op(2, "bool", operator.ge),
    "eq": Op(2, "bool", operator.eq),
    "ne": Op(2, "bool", operator.ne),
    "and": Op(2, "logic", operator.and_),
    "or": Op(2, "logic", operator.or_),
    "xor": Op(2, "logic", operator.xor),
    "not": Op(1, "logic", lambda x: (not x) if isinstance(x, bool) else ~x),
    "where": Op(3, "select", lambda c, a, b: a if c else b),
    "to_int": Op(1, "int", math.trunc),  # a float to an int, rounding toward zero (torch's .long())
}

# ops whose result is finite where their arguments are (float overflow aside; sqrt of a negative is NaN, not
# infinite), and the leaves that are
_FINITE_OPS = {"input", "tile", "add", "sub", "mul", "neg", "abs", "minimum", "maximum", "exp", "expm1", "tanh",
               "sigmoid", "sqrt", "cos", "sin", "erf", "atan", "where", "to_int", "lt", "le", "gt", "ge", "eq", "ne",
               "and", "or", "xor", "not"}


@dataclass(eq=False)
class Capture:
    """A tensor captured from the user's closure; it becomes a kernel argument."""

    tensor: torch.Tensor

    @property
    def kind(self) -> str:
        if self.tensor.dtype == torch.bool:
            return "bool"
        return "float" if self.tensor.is_floating_point() else "int"

    @property
    def differentiable(self) -> bool:
        return self.kind == "float" and self.tensor.requires_grad

    def signature(self) -> str:
        """What generated code depends on: rank, kind and whether it needs a gradient."""
        return f"{self.kind}{self.tensor.dim()}{'g' if self.differentiable else ''}"


@dataclass(frozen=True)
class TileSummary:
    """The min or max of a captured tensor over the entries one kernel tile reads.

    ``dims`` has one entry per dimension of the capture: ``None`` where the
    index is the same for the whole tile (``b``, ``h``, a constant), or
    ``(axis, divisor)`` where it is ``q_idx // divisor`` or ``kv_idx // divisor``
    (``axis`` "q" or "kv"); such a dimension is indexed by the tile number
    instead (``q_tile`` or ``kv_tile``). The launcher computes the summary
    tensors for its tile sizes; a ``"tile"`` node loads from one.
    """

    capture: int
    reduce: str  # "min" or "max"
    dims: tuple

    def describe(self) -> str:
        index = ", ".join("." if d is None else (f"{d[0]}_idx" if d[1] == 1 else f"{d[0]}_idx // {d[1]}")
                          for d in self.dims)
        return f"{self.reduce} of capture{self.capture}[{index}] over each tile"


def result_dtype(op: str, arg_dtypes: Iterable[str]) -> str:
    """The dtype of ``op`` applied to arguments of ``arg_dtypes``."""
    dtypes = list(arg_dtypes)
    rule = OPS[op].result
    if rule in ("float", "int", "bool"):
        return rule
    if rule == "logic":
        return "bool" if all(d == "bool" for d in dtypes) else "int"
    if rule == "select":
        dtypes = dtypes[1:]
    if "float" in dtypes:
        return "float"
    if rule == "select" and all(d == "bool" for d in dtypes):
        return "bool"
    return "int"


class Graph:
    """A typed op DAG with named outputs and the tensors it captures."""

    def __init__(self, captures: list[Capture] | None = None, tiles: list[TileSummary] | None = None):
        self.nx = nx.DiGraph()
        self.outputs: dict[str, int] = {}
        self.captures: list[Capture] = list(captures or [])
        self.tiles: list[TileSummary] = list(tiles or [])
        self._inputs: dict[str, int] = {}

    # -- construction -------------------------------------------------------
    def add(self, op: str, args: tuple[int, ...] = (), dtype: str | None = None, **attrs) -> int:
        """Append a node and return its id."""
        if op not in OPS:
            raise KeyError(f"unknown IR op {op!r}")
        arity = OPS[op].arity
        if arity >= 0 and len(args) != arity:
            raise ValueError(f"op {op!r} takes {arity} arguments, got {len(args)}")
        if dtype is None:
            dtype = result_dtype(op, (self.dtype(a) for a in args))
        node = self.nx.number_of_nodes()
        self.nx.add_node(node, op=op, args=tuple(args), dtype=dtype, **attrs)
        for a in args:
            self.nx.add_edge(a, node)
        return node

    def input(self, name: str, dtype: str = "int") -> int:
        """The (unique) input node called ``name``."""
        if name not in self._inputs:
            self._inputs[name] = self.add("input", (), dtype, name=name)
        return self._inputs[name]

    def const(self, value) -> int:
        if isinstance(value, bool):
            dtype = "bool"
        elif isinstance(value, int):
            dtype = "int"
        else:
            value, dtype = float(value), "float"
        return self.add("const", (), dtype, value=value)

    def load(self, capture: int, indices: tuple[int, ...]) -> int:
        kind = self.captures[capture].kind
        return self.add("load", tuple(indices), kind, capture=capture)

    def tile(self, summary: TileSummary, indices: tuple[int, ...]) -> int:
        """A load from ``summary`` (registered on first use) at one index per dimension."""
        if summary not in self.tiles:
            self.tiles.append(summary)
        kind = "bool" if self.captures[summary.capture].kind == "bool" else "int"
        return self.add("tile", tuple(indices), kind, tile=self.tiles.index(summary))

    # -- queries ------------------------------------------------------------
    def node(self, n: int) -> dict:
        return self.nx.nodes[n]

    def op(self, n: int) -> str:
        return self.nx.nodes[n]["op"]

    def args(self, n: int) -> tuple[int, ...]:
        return self.nx.nodes[n]["args"]

    def dtype(self, n: int) -> str:
        return self.nx.nodes[n]["dtype"]

    def is_const(self, n: int, value=None) -> bool:
        attrs = self.nx.nodes[n]
        return attrs["op"] == "const" and (value is None or attrs["value"] == value)

    def input_name(self, n: int) -> str | None:
        attrs = self.nx.nodes[n]
        return attrs["name"] if attrs["op"] == "input" else None

    def order(self, roots: Iterable[int] | None = None) -> list[int]:
        """Nodes that ``roots`` (default: all outputs) depend on, in topological order."""
        roots = list(self.outputs.values()) if roots is None else list(roots)
        needed = set(roots)
        for r in roots:
            needed |= nx.ancestors(self.nx, r)
        return [n for n in nx.topological_sort(self.nx) if n in needed]

    def float_constants(self, names: Iterable[str]) -> set[float]:
        """The float constants that the outputs ``names`` (those present) depend on."""
        roots = [self.outputs[name] for name in names if name in self.outputs]
        return {self.node(n)["value"] for n in self.order(roots) if self.is_const(n) and self.dtype(n) == "float"}

    def uses(self, n: int) -> int:
        """How many argument slots refer to ``n``."""
        return sum(self.args(u).count(n) for u in self.nx.successors(n))

    def finite(self, n: int) -> bool:
        """Whether ``n`` is finite wherever the kernels evaluate it (float overflow aside), by how it is built:
        from the inputs, finite constants, int / bool loads and ops that keep values finite (a division by a
        nonzero constant alone, a power to a constant >= 0 alone); not from a float load (a captured table may
        hold -inf) nor a log."""
        for m in self.order([n]):
            op, args = self.op(m), self.args(m)
            if op == "const":
                finite = not isinstance(self.node(m)["value"], float) or math.isfinite(self.node(m)["value"])
            elif op == "load":
                finite = self.dtype(m) != "float"
            elif op in ("truediv", "floordiv", "mod"):
                finite = self.dtype(m) == "int" or (self.is_const(args[1]) and self.node(args[1])["value"] != 0)
            elif op == "pow":
                finite = self.is_const(args[1]) and self.node(args[1])["value"] >= 0
            else:
                finite = op in _FINITE_OPS
            if not finite:
                return False
        return True

    def depends_on(self, n: int, input_name: str) -> bool:
        node = self._inputs.get(input_name)
        return node is not None and (node == n or nx.has_path(self.nx, node, n))

    # -- presentation -------------------------------------------------------
    def describe(self, n: int, label: Callable[[int], str] = lambda a: f"%{a}") -> str:
        """One node as text, its arguments written by ``label``."""
        attrs = self.nx.nodes[n]
        op = attrs["op"]
        if op == "input":
            return f"input {attrs['name']}"
        if op == "const":
            return f"const {attrs['value']!r}"
        args = ", ".join(label(a) for a in attrs["args"])
        if op == "load":
            return f"load capture{attrs['capture']}[{args}]"
        if op == "tile":
            return f"load tile{attrs['tile']}[{args}]"
        return f"{op}({args})"

    def text(self) -> str:
        """A deterministic listing: one line per node, then the outputs."""
        number = {n: i for i, n in enumerate(self.order())}
        label = lambda a: f"%{number[a]}"  # noqa: E731
        lines = [f"%{i}: {self.dtype(n)} = {self.describe(n, label)}" for n, i in number.items()]
        lines += [f"{name} = %{number[self.outputs[name]]}" for name in sorted(self.outputs)]
        if self.captures:
            lines.append("captures: " + ", ".join(f"capture{i}: {c.signature()}" for i, c in enumerate(self.captures)))
        lines += [f"tile{i}: {t.describe()}" for i, t in enumerate(self.tiles)]
        return "\n".join(lines)

    def fingerprint(self) -> str:
        """A hash of the graph's structure, constants and capture signatures."""
        return hashlib.sha256(self.text().encode()).hexdigest()


def rebuild(graph: Graph, rewrite: Callable[[Graph, Graph, int, tuple[int, ...]], int] | None = None) -> Graph:
    """Copy the live part of ``graph`` into a new graph, node by node.

    ``rewrite(new, old, node, new_args)`` returns the id in ``new`` that
    replaces ``node``; by default the node is copied unchanged.
    """
    new = Graph(graph.captures, graph.tiles)
    mapping: dict[int, int] = {}
    for n in graph.order():
        new_args = tuple(mapping[a] for a in graph.args(n))
        mapping[n] = (rewrite or copy_node)(new, graph, n, new_args)
    new.outputs = {name: mapping[n] for name, n in graph.outputs.items()}
    return new


def copy_node(new: Graph, old: Graph, n: int, new_args: tuple[int, ...]) -> int:
    """Copy node ``n`` of ``old`` into ``new`` with remapped arguments."""
    attrs = dict(old.node(n))
    op = attrs.pop("op")
    attrs.pop("args")
    if op == "input":
        return new.input(attrs["name"], attrs["dtype"])
    return new.add(op, new_args, **attrs)
