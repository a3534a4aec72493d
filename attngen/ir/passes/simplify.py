"""Algebraic simplification of floating-point arithmetic with sympy.

Each maximal float-arithmetic subexpression is translated to a sympy
expression in which every other node (inputs, loads, ``where``,
comparisons, integer ops, ``minimum``/``maximum``, ``abs``) is an opaque
symbol, canonicalized by sympy and translated back; the float arguments
of conversions to int, of ``//``, ``%`` and of comparisons are kept as written. Opaque nodes' own
arguments are simplified recursively. Symbols are named after new node ids
and everything is emitted in sympy's ``default_sort_key`` order, so the
result does not depend on hashing.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable

import sympy
from sympy.core.sorting import default_sort_key

from ..graph import Graph, copy_node, rebuild

ARITHMETIC = frozenset({"add", "sub", "mul", "truediv", "neg", "pow", "exp", "log", "tanh", "sigmoid", "sqrt"})
_DISCONTINUOUS = frozenset({"to_int", "floordiv", "mod", "lt", "le", "gt", "ge", "eq", "ne"})
_SMALL_POWER = 4  # integer powers up to this are emitted as multiplications
_INLINE_LIMIT = 64  # a shared subexpression larger than this (as a tree) becomes its own symbol
_FACTOR_LIMIT = 200  # factor_terms is only tried on expressions with at most this many ops
_FLOAT32_NORMAL = (2.0 ** -126, 3.4028234663852886e38)  # the magnitudes float32 holds to full precision


class Sigmoid(sympy.Function):
    """sympy has no sigmoid; this one is opaque except on numbers."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return 1 / (1 + sympy.exp(-x))
        return None


_FUNCTIONS = {"exp": sympy.exp, "log": sympy.log, "tanh": sympy.tanh, "sigmoid": Sigmoid}
_IR_FUNCTIONS = {sympy.exp: "exp", sympy.log: "log", sympy.tanh: "tanh", Sigmoid: "sigmoid"}


class _Unconvertible(Exception):
    """The sympy result uses something the IR cannot express (complex numbers, infinities)."""


def _number(value) -> sympy.Rational:
    """An exact rational for a finite constant: the simplest one that rounds back to it."""
    if isinstance(value, int):
        return sympy.Integer(value)
    nice = Fraction(value).limit_denominator(10**6)
    exact = nice if float(nice) == value else Fraction(value)
    return sympy.Rational(exact.numerator, exact.denominator)


def _count(expr: sympy.Expr) -> int:
    return int(sympy.count_ops(expr))


def _float32_numbers(expr: sympy.Expr) -> bool:
    """Whether every number in ``expr`` is 0 or a normal float32: factoring 1e-30 (1e30 x) + pi s pulls out
    a common factor of 2^-149, leaving coefficients that overflow float32."""
    low, high = _FLOAT32_NORMAL
    return all(n == 0 or low <= abs(float(n)) <= high for n in expr.atoms(sympy.Number))


class _Simplifier:
    def __init__(self, old: Graph):
        self.old = old
        self.new = Graph(old.captures)
        self.simplified: dict[int, int] = {}  # old node -> new node
        self.copied: dict[int, int] = {}
        self.exprs: dict[int, sympy.Expr] = {}  # old node -> sympy expression
        self.sizes: dict[int, int] = {}  # old node -> size of its arithmetic as a tree
        self.symbols: dict[sympy.Symbol, int] = {}  # opaque symbol -> new node
        self.emitted: dict[sympy.Expr, int] = {}

    # -- old graph -> new graph ---------------------------------------------
    def copy(self, n: int) -> int:
        """``n`` unchanged, with its arguments unchanged."""
        if n not in self.copied:
            self.copied[n] = copy_node(self.new, self.old, n, tuple(self.copy(a) for a in self.old.args(n)))
        return self.copied[n]

    def simplify(self, n: int) -> int:
        """``n`` with its float arithmetic simplified (not where it is rounded to a whole number or compared:
        there a rewrite that rounds differently could move a value across an integer or a threshold, so
        such arguments keep the order of operations the user wrote, which torch follows)."""
        if n not in self.simplified:
            if self._is_arithmetic(n):
                self.simplified[n] = self._arithmetic(n)
            else:
                keep = self._discontinuous(n)
                args = tuple(self.copy(a) if keep else self.simplify(a) for a in self.old.args(n))
                self.simplified[n] = copy_node(self.new, self.old, n, args)
        return self.simplified[n]

    def _discontinuous(self, n: int) -> bool:
        """Whether ``n`` jumps at some value of a float argument: a conversion to int, a float ``//`` or
        ``%``, a comparison of floats."""
        old = self.old
        return old.op(n) in _DISCONTINUOUS and any(old.dtype(a) == "float" for a in old.args(n))

    def _is_arithmetic(self, n: int) -> bool:
        return self.old.op(n) in ARITHMETIC and self.old.dtype(n) == "float"

    def _size(self, n: int) -> int:
        if n not in self.sizes:
            args = self.old.args(n) if self._is_arithmetic(n) else ()
            self.sizes[n] = 1 + sum(self._size(a) for a in args)
        return self.sizes[n]

    def _inline(self, n: int) -> bool:
        """False for a large shared subexpression: it becomes a symbol, as a tree it could be huge."""
        return self._size(n) <= _INLINE_LIMIT or self.old.uses(n) <= 1

    def _arithmetic(self, n: int) -> int:
        expr = self.sympy(n)
        best = expr
        if _count(expr) <= _FACTOR_LIMIT:
            # Pulling out common factors never expands anything, so it cannot
            # create cancellation; keep it only if it saves ops and its numbers fit float32.
            factored = sympy.factor_terms(expr)
            if self._convertible(factored) and _count(factored) < _count(expr) and _float32_numbers(factored):
                best = factored
        try:
            node = self.emit(best)
        except _Unconvertible:
            return copy_node(self.new, self.old, n, tuple(self.simplify(a) for a in self.old.args(n)))
        return self._as_float(node)

    # -- old graph -> sympy ---------------------------------------------------
    def sympy(self, n: int) -> sympy.Expr:
        if n in self.exprs:
            return self.exprs[n]
        old = self.old
        op, attrs = old.op(n), old.node(n)
        if self._is_arithmetic(n):
            a = [self.sympy(x) if self._inline(x) else self._symbol(x) for x in old.args(n)]
            expr = {
                "add": lambda: a[0] + a[1], "sub": lambda: a[0] - a[1], "mul": lambda: a[0] * a[1],
                "truediv": lambda: a[0] / a[1], "neg": lambda: -a[0], "pow": lambda: a[0] ** a[1],
                "sqrt": lambda: sympy.sqrt(a[0]),
            }.get(op, lambda: _FUNCTIONS[op](a[0]))()
        elif op == "const" and attrs["dtype"] in ("int", "float") and math.isfinite(attrs["value"]):
            expr = _number(attrs["value"])
        else:
            expr = self._symbol(n)
        self.exprs[n] = expr
        return expr

    def _symbol(self, n: int) -> sympy.Symbol:
        """An opaque symbol for the simplified ``n``."""
        node = self.simplify(n)
        symbol = sympy.Symbol(f"v{node}")
        self.symbols[symbol] = node
        return symbol

    @staticmethod
    def _convertible(expr: sympy.Expr) -> bool:
        return all(type(f) in _IR_FUNCTIONS for f in expr.atoms(sympy.Function))

    # -- sympy -> new graph ---------------------------------------------------
    def emit(self, expr: sympy.Expr) -> int:
        if expr not in self.emitted:
            self.emitted[expr] = self._emit(expr)
        return self.emitted[expr]

    def _emit(self, expr: sympy.Expr) -> int:
        new = self.new
        if expr in self.symbols:
            return self.symbols[expr]
        if expr.is_number:
            try:
                return new.const(float(expr))
            except TypeError as error:  # complex, zoo
                raise _Unconvertible(str(expr)) from error
        if isinstance(expr, sympy.Add):
            return self._sum(expr.args)
        if isinstance(expr, sympy.Mul):
            return self._product(expr.args)
        if isinstance(expr, sympy.Pow):
            return self._product([expr])
        if type(expr) in _IR_FUNCTIONS:
            return new.add(_IR_FUNCTIONS[type(expr)], (self.emit(expr.args[0]),))
        raise _Unconvertible(str(expr))

    def _ordered(self, items: Iterable[int]) -> list[int]:
        """Float operands first, so int operands are combined in float as before."""
        return sorted(items, key=lambda n: self.new.dtype(n) != "float")

    def _as_float(self, node: int) -> int:
        return node if self.new.dtype(node) == "float" else self.new.add("mul", (node, self.new.const(1.0)))

    def _sum(self, terms: Iterable[sympy.Expr]) -> int:
        """``a + b - c - ...``: terms with a negative coefficient are subtracted."""
        plus, minus = [], []
        for term in sorted(terms, key=default_sort_key):
            if term.as_coeff_Mul()[0].is_negative:
                minus.append(self.emit(-term))
            else:
                plus.append(self.emit(term))
        plus, minus = self._ordered(plus), self._ordered(minus)
        total = self._chain("add", plus) if plus else self.new.add("neg", (self._as_float(minus.pop(0)),))
        for m in minus:
            total = self.new.add("sub", (self._as_float(total), m))
        return total

    def _product(self, factors: Iterable[sympy.Expr]) -> int:
        """``coefficient * a * b / (c * d)`` from factors with positive and negative powers."""
        numerator, denominator, sign, divisor = [], [], 1, None
        for factor in sorted(factors, key=default_sort_key):
            if factor.is_Rational:
                sign = -1 if factor < 0 else 1
                p, q = abs(factor.p), factor.q
                if q != 1 and p == 1 and q < 2**53:  # dividing by an exact q rounds once
                    divisor = self.new.const(float(q))
                elif q != 1 or p != 1:
                    numerator.append(self.new.const(float(abs(factor))))
                continue
            if factor.is_number:  # e.g. E or sqrt(2)
                numerator.append(self.emit(factor))
                continue
            base, exponent = factor.as_base_exp() if isinstance(factor, sympy.Pow) else (factor, sympy.S.One)
            if exponent.is_number and exponent.is_negative:
                denominator.append(self._power(base, -exponent))
            else:
                numerator.append(self._power(base, exponent))
        numerator = self._ordered(numerator)
        result = self._chain("mul", numerator) if numerator else self.new.const(1.0)
        if denominator:
            result = self.new.add("truediv", (result, self._chain("mul", self._ordered(denominator))))
        if divisor is not None:
            result = self.new.add("truediv", (self._as_float(result), divisor))
        return self.new.add("neg", (self._as_float(result),)) if sign < 0 else result

    def _power(self, base: sympy.Expr, exponent: sympy.Expr) -> int:
        """``base ** exponent`` for an exponent that is not a negative number."""
        x = self.emit(base)
        if exponent.is_Integer and exponent <= _SMALL_POWER:
            return self._chain("mul", [x] * int(exponent))
        if exponent == sympy.Rational(1, 2):
            return self.new.add("sqrt", (x,))
        return self.new.add("pow", (self._as_float(x), self.emit(exponent)))

    def _chain(self, op: str, operands: list[int]) -> int:
        result = operands[0]
        for operand in operands[1:]:
            result = self.new.add(op, (self._as_float(result), operand))
        return result


def simplify(graph: Graph, names: Iterable[str] | None = None) -> Graph:
    """A copy of ``graph`` whose outputs ``names`` (default: all) have simplified float arithmetic."""
    names = set(graph.outputs if names is None else names)
    simplifier = _Simplifier(graph)
    outputs = {}
    for name in sorted(graph.outputs):
        n = graph.outputs[name]
        outputs[name] = simplifier.simplify(n) if name in names else simplifier.copy(n)
    simplifier.new.outputs = {name: outputs[name] for name in graph.outputs}
    return rebuild(simplifier.new)
