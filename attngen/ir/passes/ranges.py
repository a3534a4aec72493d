"""Closed-form loop ranges of a mask: which kv tiles a q tile visits, and the reverse.

For a q tile ``q_lo..q_hi`` the pass derives two intervals of ``kv_idx``:

``some``  every key that *some* query of the tile keeps lies inside it
          (an over-approximation: keys outside are never visited);
``all``   every key inside it is kept by *all* queries of the tile
          (an under-approximation: tiles inside need no per-element mask).

Comparisons are solved for the index when one side is an integer chain of
``+ - * //`` and negation around it (``q_idx - kv_idx <= w`` gives
``kv_idx >= q_lo - w``); ``&`` intersects, ``|`` joins, ``~`` flips what is
being solved for, and anything else (loads of the index, ``%``, floats) is
left unbounded. The other side's bounds over the tile come from the interval
analysis, so per-program values (``b``, ``h``, ``lengths[b]``) stay exact.

From them the graph gets outputs that split the loop over kv tiles into
``[kv_start, kv_split0)`` (masked), ``[kv_split0, kv_split1)`` (full: no mask
evaluated) and ``[kv_split1, kv_end)`` (masked), with ``kv_start <= kv_split0 <=
kv_split1 <= kv_end <= LK``, all multiples of ``BLOCK_N`` except ``LK`` (an
empty range may start anywhere), in terms of ``q_lo``, ``q_hi``, ``q_tile``,
``b``, ``h``, ``LK`` and ``BLOCK_N``; the same for the loop over q tiles of a
kv tile (``q_start`` ... with ``kv_lo``, ``kv_hi``, ``LQ``, ``BLOCK_M``). When
no key can be full for every query, only ``*_start``/``*_end`` are made.
Nothing depends on the sequence lengths at compile time.
"""

from __future__ import annotations

from ..graph import Graph, rebuild
from .intervals import IntervalAnalysis

BIG = 2**29  # "unbounded" inside a where/min/max selection: int32-safe after a few additions

EMPTY = "empty"  # the statically empty interval; otherwise (lo, hi) with None for an open side
ALL = (None, None)

_NEGATED = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}
_SWAPPED = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}

SEGMENTS = ("start", "split0", "split1", "end")


class _Solver:
    """Intervals of ``<axis>_idx`` where the mask can hold (``some``) or surely holds (``all``)
    for the tile of the other axis; bounds are nodes built in ``analysis.g``."""

    def __init__(self, analysis: IntervalAnalysis, axis: str, mode: str):
        self.a = analysis
        self.g = analysis.g
        self.B = analysis.B
        self.var = self.g.input(f"{axis}_idx")
        self.some = mode == "some"
        self._depends: dict[int, bool] = {}

    # -- helpers ------------------------------------------------------------------
    def depends(self, n: int) -> bool:
        if n not in self._depends:
            self._depends[n] = n == self.var or any(self.depends(a) for a in self.g.args(n))
        return self._depends[n]

    def unknown(self):
        return ALL if self.some else EMPTY

    def sentinel(self, bound, side: str) -> int:
        if bound is None:
            return self.B.const(-BIG if side == "lo" else BIG)
        return bound

    def both(self, interval) -> tuple[int, int]:
        """Bounds as nodes (static ends become sentinels)."""
        if interval == EMPTY:
            return self.B.const(BIG), self.B.const(-BIG)
        return self.sentinel(interval[0], "lo"), self.sentinel(interval[1], "hi")

    def select(self, cond: int, a, b):
        """``a`` where ``cond`` holds for this program, else ``b``."""
        if self.B.is_true(cond):
            return a
        if self.B.is_false(cond):
            return b
        (alo, ahi), (blo, bhi) = self.both(a), self.both(b)
        return self.B.op("where", cond, alo, blo), self.B.op("where", cond, ahi, bhi)

    def intersect(self, a, b):
        if a == EMPTY or b == EMPTY:
            return EMPTY
        B = self.B
        lo = a[0] if b[0] is None else b[0] if a[0] is None else B.op("maximum", a[0], b[0])
        hi = a[1] if b[1] is None else b[1] if a[1] is None else B.op("minimum", a[1], b[1])
        return lo, hi

    def hull(self, a, b):
        if a == EMPTY:
            return b
        if b == EMPTY:
            return a
        B = self.B
        return B.opt("minimum", a[0], b[0]), B.opt("maximum", a[1], b[1])

    def join(self, a, b):
        """An interval inside (``all``) or around (``some``) the union of ``a`` and ``b``."""
        if self.some or a == EMPTY or b == EMPTY or a == ALL or b == ALL:
            return self.hull(a, b)
        # all: the hull if the two overlap or touch, else the longer one
        B = self.B
        (alo, ahi), (blo, bhi) = self.both(a), self.both(b)
        one = B.const(1)
        touching = B.op("and", B.op("le", alo, B.op("add", bhi, one)), B.op("le", blo, B.op("add", ahi, one)))
        longer = B.op("ge", B.op("sub", ahi, alo), B.op("sub", bhi, blo))
        return self.select(touching, self.hull(a, b), self.select(longer, a, b))

    # -- solving ------------------------------------------------------------------
    def solve(self, n: int, holds: bool = True):
        """The interval of the index where ``n == holds`` (for some / all of the other tile)."""
        g = self.g
        op, args = g.op(n), g.args(n)
        if g.is_const(n):
            return ALL if g.node(n)["value"] == holds else EMPTY
        if not self.depends(n):
            lo, hi = self.a.val[n]  # definitely / possibly true over the tile
            if self.some:
                cond = hi if holds else self.B.op("not", lo)
            else:
                cond = lo if holds else self.B.op("not", hi)
            return self.select(cond, ALL, EMPTY)
        if op == "not" and g.dtype(n) == "bool":
            return self.solve(args[0], not holds)
        if op in ("and", "or") and g.dtype(n) == "bool":
            a, b = (self.solve(x, holds) for x in args)
            return self.intersect(a, b) if (op == "and") == holds else self.join(a, b)
        if op in ("xor", "where") and g.dtype(n) == "bool":
            if op == "xor":  # a != b
                c, x, y, flip = args[0], args[1], args[1], True
            else:
                (c, x, y), flip = args, False
            if g.dtype(c) != "bool":
                return self.unknown()
            first = self.intersect(self.solve(c, True), self.solve(x, holds != flip))
            second = self.intersect(self.solve(c, False), self.solve(y, holds))
            return self.join(first, second)
        if op in _NEGATED:
            return self.compare(op if holds else _NEGATED[op], *args)
        return self.unknown()

    def compare(self, op: str, left: int, right: int):
        g, B = self.g, self.B
        if any(g.dtype(x) != "int" for x in (left, right)) or self.depends(left) == self.depends(right):
            return self.unknown()
        if self.depends(right):
            op, left, right = _SWAPPED[op], right, left
        if op == "ne":
            return self.unknown()
        t_lo, t_hi = self.a.num(right)
        # x op t for some query of the tile: within t's widest bounds; for all: its narrowest
        low_t, high_t = (t_lo, t_hi) if self.some else (t_hi, t_lo)
        one = B.const(1)
        lower = upper = None
        if op in ("ge", "gt", "eq"):
            lower = self.bound(low_t, lambda t: B.op("add", t, one) if op == "gt" else t)
        if op in ("le", "lt", "eq"):
            upper = self.bound(high_t, lambda t: B.op("sub", t, one) if op == "lt" else t)
        if EMPTY in (lower, upper):
            return EMPTY
        return self.invert(left, lower, upper)

    def bound(self, value, make):
        """A bound computed from ``value``; an unknown ``value`` widens (some) or empties (all)."""
        if value is None:
            return None if self.some else EMPTY
        return make(value)

    def invert(self, x: int, lower, upper):
        """The interval of the index for which ``lower <= x <= upper`` (``None``: open)."""
        g, B = self.g, self.B
        if x == self.var:
            return lower, upper
        op, args = g.op(x), g.args(x)
        if g.dtype(x) != "int" or sum(self.depends(a) for a in args) != 1:
            return self.unknown()
        inner = next(a for a in args if self.depends(a))
        other = next((a for a in args if a != inner), None)
        if op == "neg":
            return self.invert(inner, B.opt("neg", upper), B.opt("neg", lower))
        if op in ("add", "sub"):
            # a + r in [L, U]: a in [L - r, U - r];  a - r: [L + r, U + r];  r - a: [-U + r, -L + r]
            if op == "sub" and inner == args[1]:
                lower, upper = B.opt("neg", upper), B.opt("neg", lower)
            r_lo, r_hi = self.a.num(other)
            d_lo, d_hi = (B.opt("neg", r_hi), B.opt("neg", r_lo)) if op == "add" else (r_lo, r_hi)
            # some: the widest interval over r; all: the narrowest
            lo = self.offset(lower, d_lo if self.some else d_hi)
            hi = self.offset(upper, d_hi if self.some else d_lo)
            if EMPTY in (lo, hi):
                return EMPTY
            return self.invert(inner, lo, hi)
        c = g.node(other)["value"] if other is not None and g.is_const(other) else None
        if op == "mul" and isinstance(c, int) and c != 0:
            k = B.const(c)
            # c * a in [L, U]  <=>  a in [ceil(L / c), floor(U / c)] (bounds swap when c < 0)
            low, high = (lower, upper) if c > 0 else (upper, lower)
            ceil = None if low is None else B.op("neg", B.op("floordiv", B.op("neg", low), k))
            floor = None if high is None else B.op("floordiv", high, k)
            return self.invert(inner, ceil, floor)
        if op == "floordiv" and inner == args[0] and isinstance(c, int) and c > 0:
            k = B.const(c)
            # a // c in [L, U]  <=>  a in [L * c, U * c + c - 1]
            return self.invert(inner, B.opt("mul", lower, k),
                               None if upper is None else B.op("add", B.op("mul", upper, k), B.const(c - 1)))
        return self.unknown()

    def offset(self, bound, by):
        """``bound + by``; an open ``bound`` stays open, an unknown ``by`` widens (some) or empties (all)."""
        if bound is None:
            return None
        if by is None:
            return None if self.some else EMPTY
        return self.B.op("add", bound, by)


def _segments(analysis: IntervalAnalysis, mask: int, axis: str) -> dict[str, int]:
    """The loop segments over ``axis`` tiles (see the module docstring), as nodes."""
    g, B = analysis.g, analysis.B
    length, block = g.input("LK" if axis == "kv" else "LQ"), g.input("BLOCK_N" if axis == "kv" else "BLOCK_M")
    zero, one = B.const(0), B.const(1)
    some = _Solver(analysis, axis, "some").solve(mask)
    if some == EMPTY:
        return {"start": zero, "end": zero}
    first, last = some

    def aligned_down(x):
        return B.op("mul", B.op("floordiv", x, block), block)

    end = length if last is None else B.op("maximum", B.op("minimum", B.op("add", last, one), length), zero)
    start = zero if first is None else B.op("minimum", aligned_down(B.op("maximum", first, zero)), end)
    full = _Solver(analysis, axis, "all").solve(mask)
    if full == EMPTY:
        return {"start": start, "end": end}
    full_first, full_last = full
    full_start = zero if full_first is None else \
        aligned_down(B.op("add", B.op("maximum", full_first, zero), B.op("sub", block, one)))
    if full_last is None:
        full_end = length
    else:
        past = B.op("add", full_last, one)
        full_end = B.op("where", B.op("ge", past, length), length, aligned_down(past))
    split0 = B.op("minimum", B.op("maximum", full_start, start), end)
    split1 = B.op("minimum", B.op("maximum", full_end, split0), end)
    return {"start": start, "split0": split0, "split1": split1, "end": end}


def loop_segments(graph: Graph, tiles: bool = True) -> Graph:
    """A copy of ``graph`` with the loop-segment outputs ``kv_start``, ... and ``q_start``, ...

    ``tiles`` lets bounds read per-tile summaries of captured tensors (see
    :class:`~attngen.ir.graph.TileSummary`). A graph without a ``mask``
    output, or with a constant one, is treated as that constant.
    """
    g = rebuild(graph)
    analysis = IntervalAnalysis(g, tiles)
    mask = g.outputs.get("mask")
    if mask is None:
        mask = analysis.B.const(True)
    analysis.run(mask)
    for axis in ("kv", "q"):
        for name, node in _segments(analysis, mask, axis).items():
            g.outputs[f"{axis}_{name}"] = node
    return rebuild(g)
