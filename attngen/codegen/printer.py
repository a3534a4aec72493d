"""Print IR expressions as Triton code.

Inside a kernel tile, ``q_idx`` is a ``[BLOCK_M, 1]`` tensor, ``kv_idx`` a
``[1, BLOCK_N]`` tensor, ``b``/``h`` are program scalars and the scaled score
is the ``[BLOCK_M, BLOCK_N]`` tensor ``qk``. Every node has *axes*: the subset
of ``{"q", "kv"}`` its value varies along, which decides load masks and how
gradient contributions are reduced before they are added to a captured tensor.
"""

from __future__ import annotations

import math

from ..ir.graph import Graph

AXES_OF_INPUT = {"score": frozenset({"q", "kv"}), "q_idx": frozenset({"q"}), "kv_idx": frozenset({"kv"}),
                 "n_kept": frozenset({"q"}), "logit": frozenset({"q", "kv"})}
VARIABLE_OF_INPUT = {"score": "qk"}

# Python operator precedence, low to high; an operand binding looser than its
# operator is parenthesized.
COMPARE, OR, XOR, AND, ADD, MUL, UNARY, ATOM = range(8)
_INFIX = {"add": ("+", ADD), "sub": ("-", ADD), "mul": ("*", MUL), "truediv": ("/", MUL),
          "lt": ("<", COMPARE), "le": ("<=", COMPARE), "gt": (">", COMPARE), "ge": (">=", COMPARE),
          "eq": ("==", COMPARE), "ne": ("!=", COMPARE), "and": ("&", AND), "or": ("|", OR), "xor": ("^", XOR)}
_CALL = {"minimum": "tl.minimum", "maximum": "tl.maximum", "abs": "tl.abs", "exp": "tl.exp",
         "log": "tl.log", "sigmoid": "_sigmoid", "sqrt": "tl.sqrt", "tanh": "_tanh", "where": "tl.where",
         "cos": "tl.cos", "sin": "tl.sin", "erf": "tl.erf", "log1p": "_log1p", "expm1": "_expm1",
         "atan": "_atan"}
_FLOAT_ARGS = {"truediv", "exp", "log", "tanh", "sigmoid", "sqrt", "cos", "sin", "erf", "log1p", "expm1", "atan"}

_LINE = 100  # an expression longer than this is not inlined into the next
Expr = tuple[str, int]  # source text and the precedence of its outermost operator


def literal(value) -> Expr:
    """A Python literal Triton accepts for a constant."""
    if isinstance(value, (bool, int)):
        return repr(value), (UNARY if value < 0 else ATOM)
    if math.isnan(value):
        return 'float("nan")', ATOM
    if math.isinf(value):
        return ('float("inf")' if value > 0 else 'float("-inf")'), ATOM
    return repr(float(value)), (UNARY if value < 0 else ATOM)


def operand(expr: Expr, binding: int) -> str:
    """``expr`` as an operand of an operator of precedence ``binding``."""
    text, precedence = expr
    return text if precedence >= binding else f"({text})"


class TritonPrinter:
    """Turns named outputs of a :class:`Graph` into Triton statements."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._axes: dict[int, frozenset] = {}

    def axes(self, n: int) -> frozenset:
        """The tile axes node ``n`` varies along."""
        if n not in self._axes:
            name = self.graph.input_name(n)
            if name is not None:
                self._axes[n] = AXES_OF_INPUT.get(name, frozenset())
            else:
                self._axes[n] = frozenset().union(*(self.axes(a) for a in self.graph.args(n)))
        return self._axes[n]

    def index_axes(self, load: int) -> frozenset:
        """The axes along which the element a load reads changes."""
        return frozenset().union(*(self.axes(a) for a in self.graph.args(load)))

    def offset(self, load: int, names: dict[int, Expr]) -> str:
        """The element offset a load node reads, as a Triton expression."""
        cap = self.graph.node(load)["capture"]
        terms = [f"{operand(names[a], MUL + 1)} * cap{cap}_s{d}" for d, a in enumerate(self.graph.args(load))
                 if not self.graph.is_const(a, 0)]
        return " + ".join(terms) if terms else "0"

    def statements(self, targets: dict[str, str], also: tuple[int, ...] = ()) -> tuple[list[str], dict[int, Expr]]:
        """Lines assigning each ``variable: output-name`` pair of ``targets``.

        Nodes used once are inlined; shared ones, and those whose expression is longer than a line
        (a sum of many products), get a ``t<N>`` temporary.
        Also returns the expression of every node computed, ``also`` included.
        """
        variable_of: dict[int, str] = {}
        for variable, output in targets.items():
            variable_of.setdefault(self.graph.outputs[output], variable)
        keep = set(also)
        names: dict[int, Expr] = {}
        lines = []
        for n in self.graph.order(list(variable_of) + list(also)):
            expr = self._expression(n, names)
            if self.graph.op(n) in ("input", "const"):
                names[n] = expr
            elif n in variable_of or n in keep or self.graph.uses(n) > 1 or len(expr[0]) > _LINE:
                variable = variable_of.get(n, f"t{n}")
                lines.append(f"{variable} = {expr[0]}")
                names[n] = (variable, ATOM)
            else:
                names[n] = expr
        for variable, output in targets.items():
            if names[self.graph.outputs[output]][0] != variable:
                lines.append(f"{variable} = {names[self.graph.outputs[output]][0]}")
        return lines, names

    def _as_float(self, n: int, names: dict[int, Expr]) -> Expr:
        if self.graph.dtype(n) == "float":
            return names[n]
        if self.graph.op(n) == "const":
            return literal(float(self.graph.node(n)["value"]))
        return f"{operand(names[n], ATOM)}.to(tl.float32)", ATOM

    def _expression(self, n: int, names: dict[int, Expr]) -> Expr:
        g = self.graph
        attrs = g.node(n)
        op, args = attrs["op"], attrs["args"]
        if op == "input":
            return VARIABLE_OF_INPUT.get(attrs["name"], attrs["name"]), ATOM
        if op == "const":
            return literal(attrs["value"])
        if op == "load":
            return self._load(n, names)
        if op == "tile":
            tile = attrs["tile"]
            offset = " + ".join(f"{operand(names[a], MUL + 1)} * tile{tile}_s{d}" for d, a in enumerate(args))
            value = f"tl.load(tile{tile} + {offset or '0'})"
            return (f"{value} != 0", COMPARE) if attrs["dtype"] == "bool" else (value, ATOM)
        operands = [self._as_float(a, names) if op in _FLOAT_ARGS else names[a] for a in args]
        if op in _INFIX:
            symbol, binding = _INFIX[op]
            left = operand(operands[0], binding + 1 if binding == COMPARE else binding)
            return f"{left} {symbol} {operand(operands[1], binding + 1)}", binding
        if op in ("neg", "not"):
            return f"{'-' if op == 'neg' else '~'}{operand(operands[0], UNARY)}", UNARY
        if op in ("floordiv", "mod"):
            kind = "float" if attrs["dtype"] == "float" else "int"
            return f"_{op}_{kind}({operands[0][0]}, {operands[1][0]})", ATOM
        if op == "pow":
            return self._pow(args, names)
        if op == "to_int":  # rounds toward zero, as torch's .long()
            return f"{operand(operands[0], ATOM)}.to(tl.int32)", ATOM
        if op in ("minimum", "maximum") and attrs["dtype"] == "float":  # the helpers that propagate NaN
            return f"_{op}({operands[0][0]}, {operands[1][0]})", ATOM
        return f"{_CALL[op]}({', '.join(text for text, _ in operands)})", ATOM

    def _pow(self, args: tuple[int, int], names: dict[int, Expr]) -> Expr:
        base, exponent = args
        g = self.graph
        x = operand(names[base], MUL + 1)
        if g.is_const(exponent) and float(g.node(exponent)["value"]).is_integer():
            power = int(g.node(exponent)["value"])
            integer = g.dtype(base) != "float" and g.dtype(exponent) == "int"
            if power == 0:
                return literal(1 if integer else 1.0)
            if 0 < abs(power) <= 4 or (integer and 0 < power <= 64):
                product = " * ".join([x] * abs(power))
                return (product, MUL) if power > 0 else (f"1.0 / ({product})", MUL)
            return f"_pow_int({self._as_float(base, names)[0]}, {power})", ATOM
        if g.is_const(exponent, 0.5):
            return f"tl.sqrt({self._as_float(base, names)[0]})", ATOM
        y, x = self._as_float(exponent, names), self._as_float(base, names)
        return f"tl.exp({operand(y, MUL)} * tl.log({x[0]}))", ATOM

    def _load(self, n: int, names: dict[int, Expr]) -> Expr:
        cap = self.graph.node(n)["capture"]
        axes = self.index_axes(n)
        masks = [m for axis, m in (("q", "q_valid"), ("kv", "kv_valid")) if axis in axes]
        mask = f", mask={' & '.join(masks)}, other=0" if masks else ""
        value = f"tl.load(cap{cap} + {self.offset(n, names)}{mask})"
        kind = self.graph.captures[cap].kind
        if kind == "float":
            return f"{value}.to(tl.float32)", ATOM
        if kind == "bool":
            return f"{value} != 0", COMPARE
        return value, ATOM
