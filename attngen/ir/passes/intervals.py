"""Block-level mask analysis by interval arithmetic.

:func:`block_bounds` adds two outputs to a graph, both bool expressions over
the new int inputs ``q_lo``, ``q_hi``, ``kv_lo``, ``kv_hi`` (inclusive bounds
of a q-block x kv-block rectangle) and the per-program inputs ``b``, ``h``:

``block_live``  False only if the mask is False at *every* position of the
                rectangle (the block can be skipped);
``block_full``  True only if the mask is True at *every* position (the
                per-element mask can be skipped).

Both are sound over-approximations, never exact claims the other way.

Abstract values, decided per node of the mask subgraph:

* int / float nodes: a pair ``(lo, hi)`` of node ids bounding the value over
  the rectangle, where either bound may be ``None`` -- statically unbounded on
  that side (loads of captured tensors, ops that are not modelled). Ints may be
  half-bounded (``minimum(load, kv_idx)`` keeps its upper bound); float values
  are either fully bounded or fully unbounded, because a float coming from an
  unbounded source may be NaN, which breaks one-sided reasoning.
* bool nodes: a pair ``(lo, hi)`` of bool node ids meaning "definitely true"
  and "possibly true"; unknown is ``(False, True)``.

A node that does not depend on ``q_idx``/``kv_idx`` (only on ``b``, ``h``,
constants and loads indexed by them) is exact per program; int and bool ones
are reused as-is as ``(x, x)`` -- e.g. ``doc_id[b] == 3`` stays exact.

With ``tiles=True``, an int or bool load whose indices are exact or of the
form ``q_idx // c`` / ``kv_idx // c`` (constant ``c >= 1``) is bounded by
per-tile summaries (:class:`~attngen.ir.graph.TileSummary`): the min and max
of the entries the tile reads, indexed by the inputs ``q_tile``/``kv_tile``.
Such bounds hold only when the rectangle is exactly one kernel tile.

Unboundedness is static (``None``), never an infinity constant. Bound
expressions only add ops of the same magnitude as the mask's own arithmetic
(corner products of a ``mul`` may exceed the values the mask actually reaches
when its operands are correlated).
"""

from __future__ import annotations

import math

from ..graph import Graph, TileSummary, rebuild
from .fold import fold_node

BLOCK_INPUTS = ("q_lo", "q_hi", "kv_lo", "kv_hi")
EXACT_INPUTS = ("b", "h")

# Comparisons: op -> the op with swapped operands.
_SWAPPED = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}


class _Builder:
    """Builds nodes in ``graph`` with :func:`fold_node`, sharing identical ones.

    Sharing (constants included) is not only for size: it lets identities such
    as ``x - x`` and ``x <= x`` see bounds built twice the same way as one node.
    """

    def __init__(self, graph: Graph):
        self.g = graph
        self.memo: dict[tuple, int] = {}

    def const(self, value, dtype: str | None = None) -> int:
        if dtype is None:
            dtype = "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "float"
        value = {"bool": bool, "int": int, "float": float}[dtype](value)
        key = ("const", dtype, value)
        if key not in self.memo:
            self.memo[key] = self.g.add("const", (), dtype, value=value)
        return self.memo[key]

    def is_true(self, n: int) -> bool:
        return self.g.is_const(n) and self.g.node(n)["value"] is True

    def is_false(self, n: int) -> bool:
        return self.g.is_const(n) and self.g.node(n)["value"] is False

    def op(self, op: str, *args: int) -> int:
        if (op, args) not in self.memo:
            n = fold_node(self.g, op, args)
            self.memo[op, args] = self.const(self.g.node(n)["value"], self.g.dtype(n)) if self.g.is_const(n) else n
        return self.memo[op, args]

    # -- None-propagating helpers --------------------------------------------
    def opt(self, op: str, *args):
        """``op(*args)``, or ``None`` (unbounded) if any argument is."""
        return None if any(a is None for a in args) else self.op(op, *args)

    def sel(self, cond: int, a, b):
        """``where(cond, a, b)`` on optional bounds; ``None`` unless decidable."""
        if self.is_true(cond):
            return a
        if self.is_false(cond):
            return b
        if a is None or b is None:
            return None
        return self.op("where", cond, a, b)

    def definitely(self, op: str, x, y) -> int:
        """``x op y`` as a certainty: False when a bound is unknown."""
        return self.const(False) if x is None or y is None else self.op(op, x, y)

    def possibly(self, op: str, x, y) -> int:
        """``x op y`` as a possibility: True when a bound is unknown."""
        return self.const(True) if x is None or y is None else self.op(op, x, y)


def tile_axis(g: Graph, n: int) -> tuple[str, int] | None:
    """``(axis, c)`` if ``n`` is ``q_idx // c`` or ``kv_idx // c`` (``c`` a constant >= 1, 1 for the index itself)."""
    name = g.input_name(n)
    if name in ("q_idx", "kv_idx"):
        return name[:-4], 1
    if g.op(n) == "floordiv":
        inner, divisor = g.args(n)
        if g.is_const(divisor) and g.dtype(divisor) == "int" and g.node(divisor)["value"] >= 1:
            axis = tile_axis(g, inner)
            if axis is not None:
                return axis[0], axis[1] * g.node(divisor)["value"]
    return None


class IntervalAnalysis:
    """Abstract interpretation of the mask subgraph of ``g`` (mutated in place).

    After :meth:`run`, ``val[n]`` is the interval of every node ``n`` the root
    depends on and ``invariant[n]`` tells whether it is exact per program.
    """

    def __init__(self, g: Graph, tiles: bool = False):
        self.g = g
        self.B = _Builder(g)
        self.tiles = tiles
        self.val: dict[int, tuple] = {}
        self.invariant: dict[int, bool] = {}

    # -- conversions ----------------------------------------------------------
    def num(self, n: int) -> tuple:
        """The numeric interval of ``n``; a bool becomes an int interval in [0, 1]."""
        lo, hi = self.val[n]
        if self.g.dtype(n) != "bool":
            return lo, hi
        B = self.B
        one, zero = B.const(1), B.const(0)
        return B.op("where", lo, one, zero), B.op("where", hi, one, zero)

    def condition(self, c: int) -> tuple[int, int]:
        """The bool interval of a ``where`` condition (a non-bool one is unknown)."""
        return self.val[c] if self.g.dtype(c) == "bool" else self.unknown()

    def unknown(self) -> tuple[int, int]:
        return self.B.const(False), self.B.const(True)

    def summary(self, n: int) -> tuple[int, int] | None:
        """The (min, max) per-tile summary nodes bounding load ``n``, or None."""
        g = self.g
        capture = g.node(n)["capture"]
        if not self.tiles or g.captures[capture].kind == "float":
            return None
        dims, indices = [], []
        for a in g.args(n):
            axis = None if self.invariant[a] else tile_axis(g, a)
            if axis is None and not self.invariant[a]:
                return None
            dims.append(axis)
            indices.append(a if axis is None else g.input(f"{axis[0]}_tile"))
        dims, indices = tuple(dims), tuple(indices)
        return tuple(g.tile(TileSummary(capture, reduce, dims), indices) for reduce in ("min", "max"))

    def finish(self, n: int, bounds: tuple) -> tuple:
        """Normalise the interval of a numeric node (floats are all-or-nothing)."""
        lo, hi = bounds
        if self.g.dtype(n) == "float" and (lo is None or hi is None):
            return None, None
        return lo, hi

    # -- the walk -------------------------------------------------------------
    def run(self, root: int) -> tuple[int, int]:
        g = self.g
        for n in g.order([root]):
            attrs = g.node(n)
            op, args = attrs["op"], attrs["args"]
            if op == "input":
                inv = attrs["name"] in EXACT_INPUTS
            elif op == "const":
                inv = True
            else:
                inv = all(self.invariant[a] for a in args)
            self.invariant[n] = inv
            if inv and g.dtype(n) in ("int", "bool"):
                self.val[n] = (n, n)  # exact per program, no NaN possible
                continue
            if g.dtype(n) == "bool":
                self.val[n] = self.boolean(n, op, args)
            else:
                self.val[n] = self.finish(n, self.numeric(n, op, args))
        return self.val[root]

    # -- numeric rules ----------------------------------------------------------
    def numeric(self, n: int, op: str, args: tuple[int, ...]) -> tuple:
        g, B = self.g, self.B
        if op == "input":
            name = g.node(n)["name"]
            if name == "q_idx":
                return g.input("q_lo"), g.input("q_hi")
            if name == "kv_idx":
                return g.input("kv_lo"), g.input("kv_hi")
            if name in EXACT_INPUTS:
                return n, n
            return None, None
        if op == "const":
            value = g.node(n)["value"]
            if isinstance(value, float) and not math.isfinite(value):
                return None, None
            return n, n
        if op == "load":
            return self.summary(n) or (None, None)
        if op == "where":
            return self.where_numeric(*args)
        if g.dtype(n) == "int" and op in ("and", "or", "xor"):
            return None, None  # bitwise ops on ints: not modelled
        if g.dtype(n) == "int" and op == "not":
            lo, hi = self.num(args[0])  # ~x == -x - 1
            return B.opt("sub", B.opt("neg", hi), B.const(1)), B.opt("sub", B.opt("neg", lo), B.const(1))

        ints = [self.num(a) for a in args]
        if op in ("add", "sub", "neg", "abs", "minimum", "maximum"):
            return getattr(self, f"rule_{op}")(*ints)
        if op == "mul":
            return self.rule_mul(n, args, *ints)
        if op in ("floordiv", "truediv"):
            return self.rule_div(op, args, *ints)
        if op == "mod":
            return self.rule_mod(n, args, *ints)
        if op == "pow":
            return self.rule_pow(n, args, *ints)
        if op in ("tanh", "sigmoid", "atan"):
            (lo, hi), = ints  # monotone non-decreasing and never infinite
            return B.opt(op, lo), B.opt(op, hi)
        if op == "to_int":  # monotone; bounds clamped to +-2^30 first (past that the value's own conversion
            (lo, hi), = ints  # overflows 32 bits, undefined in the kernel as in torch)
            limit = B.const(float(2**30))
            return tuple(B.opt("to_int", B.opt("minimum", B.opt("maximum", x, B.opt("neg", limit)), limit))
                         for x in (lo, hi))
        if op in ("cos", "sin"):
            (lo, hi), = ints  # NaN of an infinite argument: only bounded ones are
            return (None, None) if lo is None else (B.const(-1.0), B.const(1.0))
        # exp (overflows to inf), log, sqrt (NaN): not modelled.
        return None, None

    def rule_add(self, a, b):
        B = self.B
        return B.opt("add", a[0], b[0]), B.opt("add", a[1], b[1])

    def rule_sub(self, a, b):
        B = self.B
        return B.opt("sub", a[0], b[1]), B.opt("sub", a[1], b[0])

    def rule_neg(self, a):
        B = self.B
        return B.opt("neg", a[1]), B.opt("neg", a[0])

    def rule_abs(self, a):
        B = self.B
        lo, hi = a
        if lo is None or hi is None:
            return B.const(0), None  # an int; floats are normalised to unbounded
        zero = B.const(0)
        low = B.sel(B.op("ge", lo, zero), lo, B.sel(B.op("le", hi, zero), B.op("neg", hi), zero))
        return low, B.op("maximum", B.op("neg", lo), hi)

    def rule_minimum(self, a, b):
        B = self.B
        hi = B.opt("minimum", a[1], b[1])
        if hi is None:  # min(x, y) <= x and <= y
            hi = a[1] if a[1] is not None else b[1]
        return B.opt("minimum", a[0], b[0]), hi

    def rule_maximum(self, a, b):
        B = self.B
        lo = B.opt("maximum", a[0], b[0])
        if lo is None:
            lo = a[0] if a[0] is not None else b[0]
        return lo, B.opt("maximum", a[1], b[1])

    def _const_arg(self, args, i):
        """The finite numeric constant value of argument ``i``, else ``None``."""
        g = self.g
        a = args[i]
        if not g.is_const(a) or g.dtype(a) == "bool":
            return None
        value = g.node(a)["value"]
        return value if math.isfinite(value) else None

    def rule_mul(self, n, args, a, b):
        B = self.B
        for x, i in ((a, 1), (b, 0)):
            c = self._const_arg(args, i)
            if c is None:
                continue
            k = args[i]
            if c == 0:
                if x[0] is not None and x[1] is not None:
                    z = B.op("mul", x[0], k)
                    return z, z
                return (B.const(0), B.const(0)) if self.g.dtype(n) == "int" else (None, None)
            if c > 0:
                return B.opt("mul", x[0], k), B.opt("mul", x[1], k)
            if c < 0:
                return B.opt("mul", x[1], k), B.opt("mul", x[0], k)
        if None in a or None in b:
            return None, None
        corners = [B.op("mul", x, y) for x in a for y in b]
        lo, hi = corners[0], corners[0]
        for c in corners[1:]:
            lo, hi = B.op("minimum", lo, c), B.op("maximum", hi, c)
        return lo, hi

    def rule_div(self, op, args, a, _b):
        """``floordiv``/``truediv`` by a non-zero constant: monotone."""
        B = self.B
        c = self._const_arg(args, 1)
        if c is None or c == 0:
            return None, None
        k = args[1]
        if c > 0:
            return B.opt(op, a[0], k), B.opt(op, a[1], k)
        return B.opt(op, a[1], k), B.opt(op, a[0], k)

    def rule_mod(self, n, args, a, _b):
        """``x % c`` (sign of the divisor) for a non-zero constant ``c``."""
        g, B = self.g, self.B
        c = self._const_arg(args, 1)
        if c is None or c == 0:
            return None, None
        if g.dtype(n) == "float":
            if a[0] is None or a[1] is None:
                return None, None  # inf % c is NaN
            # float rounding can give exactly c (e.g. -1e-20 % 1.0 == 1.0): closed range.
            return (B.const(0.0), B.const(c, "float")) if c > 0 else (B.const(c, "float"), B.const(0.0))
        k = args[1]
        full = (B.const(0), B.const(c - 1)) if c > 0 else (B.const(c + 1), B.const(0))
        lo, hi = a
        if lo is None or hi is None:
            return full
        # exact when the whole range lies in one period: then x % c is increasing.
        same = B.op("eq", B.op("floordiv", lo, k), B.op("floordiv", hi, k))
        return B.sel(same, B.op("mod", lo, k), full[0]), B.sel(same, B.op("mod", hi, k), full[1])

    def rule_pow(self, n, args, a, _b):
        """``x ** k`` for a constant int ``k >= 0``."""
        g, B = self.g, self.B
        k = args[1]
        if not (g.is_const(k) and g.dtype(k) == "int") or g.node(k)["value"] < 0:
            return None, None
        e = g.node(k)["value"]
        if e == 0:
            one = B.const(1, g.dtype(n))
            return one, one
        lo, hi = a
        if e % 2 == 1:
            return B.opt("pow", lo, k), B.opt("pow", hi, k)
        if lo is None or hi is None:
            return B.const(0), None
        zero = B.const(0)
        plo, phi = B.op("pow", lo, k), B.op("pow", hi, k)
        low = B.sel(B.op("ge", lo, zero), plo, B.sel(B.op("le", hi, zero), phi, zero))
        return low, B.op("maximum", plo, phi)

    def where_numeric(self, c, a, b):
        B = self.B
        clo, chi = self.condition(c)
        (alo, ahi), (blo, bhi) = self.num(a), self.num(b)
        lo = B.sel(clo, alo, B.sel(chi, B.opt("minimum", alo, blo), blo))
        hi = B.sel(clo, ahi, B.sel(chi, B.opt("maximum", ahi, bhi), bhi))
        return lo, hi

    # -- bool rules ---------------------------------------------------------------
    def boolean(self, n: int, op: str, args: tuple[int, ...]) -> tuple[int, int]:
        g, B = self.g, self.B
        if op == "const":
            return n, n
        if op == "load":
            return self.summary(n) or self.unknown()
        if op == "input":
            return self.unknown()
        if op in _SWAPPED:
            return self.compare(op, self.num(args[0]), self.num(args[1]))
        if op in ("and", "or", "xor", "not") and all(g.dtype(a) == "bool" for a in args):
            vals = [self.val[a] for a in args]
            if op == "not":
                (lo, hi), = vals
                return B.op("not", hi), B.op("not", lo)
            (alo, ahi), (blo, bhi) = vals
            if op == "and":
                return B.op("and", alo, blo), B.op("and", ahi, bhi)
            if op == "or":
                return B.op("or", alo, blo), B.op("or", ahi, bhi)
            # xor: true where exactly one side is true
            lo = B.op("or", B.op("and", alo, B.op("not", bhi)), B.op("and", B.op("not", ahi), blo))
            hi = B.op("or", B.op("and", ahi, B.op("not", blo)), B.op("and", B.op("not", alo), bhi))
            return lo, hi
        if op == "where":
            c, a, b = args
            (clo, chi), (alo, ahi), (blo, bhi) = self.condition(c), self.val[a], self.val[b]
            lo = B.op("or", B.op("or", B.op("and", clo, alo), B.op("and", B.op("not", chi), blo)),
                      B.op("and", alo, blo))
            hi = B.op("or", B.op("and", chi, ahi), B.op("and", B.op("not", clo), bhi))
            return lo, hi
        return self.unknown()

    def compare(self, op: str, a: tuple, b: tuple) -> tuple[int, int]:
        B = self.B
        (alo, ahi), (blo, bhi) = a, b
        if op in ("gt", "ge"):
            return self.compare(_SWAPPED[op], b, a)
        if op in ("lt", "le"):
            return B.definitely(op, ahi, blo), B.possibly(op, alo, bhi)
        eq_lo = B.op("and", B.definitely("le", ahi, blo), B.definitely("le", bhi, alo))
        if op == "eq":
            return eq_lo, B.op("and", B.possibly("le", alo, bhi), B.possibly("le", blo, ahi))
        ne_lo = B.op("or", B.definitely("lt", ahi, blo), B.definitely("lt", bhi, alo))
        return ne_lo, B.op("not", eq_lo)


def block_bounds(graph: Graph, tiles: bool = False) -> Graph:
    """A copy of ``graph`` with outputs ``block_live`` and ``block_full``.

    Both are bool expressions over the int inputs ``q_lo``, ``q_hi``,
    ``kv_lo``, ``kv_hi`` (inclusive rectangle bounds) and ``b``, ``h``:
    ``block_live`` is False only if the mask is False on the whole rectangle,
    ``block_full`` is True only if it is True on the whole rectangle. A graph
    without a ``mask`` output is treated as unmasked (all True). With
    ``tiles``, loads may be bounded by per-tile summaries (then the rectangle
    must be one kernel tile, numbered by the inputs ``q_tile``, ``kv_tile``).
    """
    g = rebuild(graph)
    analysis = IntervalAnalysis(g, tiles)
    if "mask" in g.outputs:
        lo, hi = analysis.run(g.outputs["mask"])
    else:
        lo = hi = analysis.B.const(True)
    g.outputs["block_live"] = hi
    g.outputs["block_full"] = lo
    return rebuild(g)
