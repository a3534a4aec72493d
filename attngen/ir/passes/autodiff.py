"""Reverse-mode differentiation of one output with respect to the score and loaded values."""

from __future__ import annotations

import math

from ..graph import Graph, rebuild


class _Adjoints:
    """Builds the backward nodes of one output inside a working copy of the graph."""

    def __init__(self, graph: Graph, output: int, wrt: str):
        self.g = graph
        self.wrt = wrt
        self.order = graph.order([output])
        self.active = self._active()
        # the parts of each node's adjoint, each with the where branches it came through: (condition, taken)
        # pairs, outermost first. Such a part is 0 where a branch is not taken, and is made 0 there once it
        # leaves the branch, so that an infinite derivative inside it (log(x) at x = 0, in a branch for huge x)
        # cannot make 0 * inf = NaN in what the other branch computes
        self.parts: dict[int, list[tuple[int, tuple]]] = {}
        if output in self.active:
            self.parts[output] = [(graph.const(1.0), ())]

    def _active(self) -> set[int]:
        """Float nodes that depend on the score or on a load of a differentiable capture."""
        g, active = self.g, set()
        for n in self.order:
            if g.dtype(n) != "float":
                continue
            leaf = g.input_name(n) == self.wrt or (
                g.op(n) == "load" and g.captures[g.node(n)["capture"]].differentiable)
            if leaf or any(a in active for a in g.args(n)):
                active.add(n)
        return active

    def add(self, op: str, *args: int) -> int:
        return self.g.add(op, args)

    def const(self, value) -> int:
        return self.g.const(value)

    def adjoint(self, n: int, inside: bool = False) -> int:
        """The sum of everything accumulated for ``n``, or 0.0: each part 0 where a branch it came through is not
        taken (``inside``: as they are, for a node whose parts all came through the same branches)."""
        parts = [part if inside else self._masked(part, branches)
                 for part, branches in self.parts.get(n, [])] or [self.const(0.0)]
        total = parts[0]
        for p in parts[1:]:
            total = self.add("add", total, p)
        return total

    def run(self) -> None:
        for n in reversed(self.order):
            if n in self.parts and self.g.op(n) not in ("input", "load"):
                shared = {branches for _, branches in self.parts[n]}
                branches = shared.pop() if len(shared) == 1 else ()
                for arg, part, taken in self._local_branches(n, self.adjoint(n, inside=bool(branches))):
                    if arg in self.active:
                        self.parts.setdefault(arg, []).append((part, branches + taken))

    def _local_branches(self, n: int, d: int) -> list[tuple[int, int, tuple]]:
        """:meth:`_local`'s pairs with the branch each enters: a where passes ``d`` to its value arguments,
        each under its branch (made 0 where that is not taken when the part leaves it)."""
        if self.g.op(n) != "where":
            return [(arg, part, ()) for arg, part in self._local(n, d)]
        condition, taken, other = self.g.args(n)
        return [(taken, d, ((condition, True),)), (other, d, ((condition, False),))]

    def _masked(self, part: int, branches: tuple) -> int:
        """``part`` where every one of ``branches`` is taken, else 0."""
        zero = self.const(0.0)
        for condition, taken in reversed(branches):
            part = self.add("where", condition, part, zero) if taken else self.add("where", condition, zero, part)
        return part

    def _local(self, n: int, d: int) -> list[tuple[int, int]]:
        """(argument, contribution to its adjoint) pairs of node ``n`` with adjoint ``d``."""
        g, add, const = self.g, self.add, self.const
        op, args = g.op(n), g.args(n)
        x = args[0] if args else None
        y = args[1] if len(args) > 1 else None
        if op == "add":
            return [(x, d), (y, d)]
        if op == "sub":
            return [(x, d), (y, add("neg", d))]
        if op == "mul":
            return [(x, add("mul", d, y)), (y, add("mul", d, x))]
        if op == "truediv":
            return [(x, add("truediv", d, y)), (y, add("neg", add("truediv", add("mul", d, n), y)))]
        if op == "neg":
            return [(x, add("neg", d))]
        if op == "pow":
            return self._pow(n, d, x, y)
        if op == "exp":
            return [(x, add("mul", d, n))]
        if op == "log":
            return [(x, add("truediv", d, x))]
        if op == "log1p":
            return [(x, add("truediv", d, add("add", const(1.0), x)))]
        if op == "expm1":
            return [(x, add("mul", d, add("add", n, const(1.0))))]
        if op == "tanh":
            return [(x, add("mul", d, add("sub", const(1.0), add("pow", n, const(2)))))]
        if op == "sigmoid":
            return [(x, add("mul", d, add("mul", n, add("sub", const(1.0), n))))]
        if op == "sqrt":
            return [(x, add("truediv", d, add("mul", const(2.0), n)))]
        if op == "cos":
            return [(x, add("neg", add("mul", d, add("sin", x))))]
        if op == "sin":
            return [(x, add("mul", d, add("cos", x)))]
        if op == "erf":  # 2 / sqrt(pi) exp(-x^2)
            gaussian = add("exp", add("neg", add("mul", x, x)))
            return [(x, add("mul", d, add("mul", const(2.0 / math.sqrt(math.pi)), gaussian)))]
        if op == "atan":
            return [(x, add("truediv", d, add("add", const(1.0), add("mul", x, x))))]
        if op == "abs":  # torch's: 0 at 0
            sign = add("where", add("gt", x, const(0.0)), const(1.0),
                       add("where", add("lt", x, const(0.0)), const(-1.0), const(0.0)))
            return [(x, add("mul", d, sign))]
        if op in ("minimum", "maximum"):
            # Ties send the whole gradient to x, so clamp(x, lo, hi) matches torch.clamp.
            first = add("le" if op == "minimum" else "ge", x, y)
            return [(x, add("where", first, d, const(0.0))), (y, add("where", first, const(0.0), d))]
        return []  # floordiv, mod: piecewise constant (where: see _local_branches)

    def _pow(self, n: int, d: int, x: int, y: int) -> list[tuple[int, int]]:
        """d(x**y)/dx = y * x**(y-1) and d(x**y)/dy = x**y * log(x), zero where torch makes them zero."""
        g, add, const = self.g, self.add, self.const
        if g.is_const(y):
            exponent = g.node(y)["value"]
            if exponent == 0:
                return []
            return [(x, add("mul", d, add("mul", y, add("pow", x, const(exponent - 1)))))]
        dx = add("mul", y, add("pow", x, add("sub", y, const(1))))
        dx = add("where", add("eq", y, const(0.0)), const(0.0), dx)
        dy = add("mul", n, add("log", x))
        dy = add("where", add("and", add("eq", x, const(0.0)), add("ge", y, const(0.0))), const(0.0), dy)
        return [(x, add("mul", d, dx)), (y, add("mul", d, dy))]


def differentiate(graph: Graph, output: str = "score", wrt: str = "score", prefix: str = "") -> Graph:
    """A copy of ``graph`` with gradient outputs of ``graph.outputs[output]``.

    Adds ``<prefix>d_score`` (the derivative with respect to the input named
    ``wrt``) and, for the k-th load of a differentiable capture that the output
    depends on (in topological order), ``<prefix>load:k`` (the loaded value)
    and ``<prefix>grad:k`` (the derivative with respect to it). Existing
    outputs are kept.
    """
    work = rebuild(graph)
    adjoints = _Adjoints(work, work.outputs[output], wrt)
    adjoints.run()
    leaf = [n for n in adjoints.order if work.input_name(n) == wrt]
    work.outputs[f"{prefix}d_score"] = adjoints.adjoint(leaf[0]) if leaf else work.const(0.0)
    loads = [n for n in adjoints.order if work.op(n) == "load"
             and work.captures[work.node(n)["capture"]].differentiable]
    for k, n in enumerate(loads):
        work.outputs[f"{prefix}load:{k}"] = n
        work.outputs[f"{prefix}grad:{k}"] = adjoints.adjoint(n)
    return rebuild(work)
