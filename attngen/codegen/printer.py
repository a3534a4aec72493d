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

AXES_OF_INPUT = {"score": frozenset({"q", "kv"}), "q_idx": frozenset({"q"}), "kv_idx": frozenset({"kv"})}
VARIABLE_OF_INPUT = {"score": "qk"}

_INFIX = {"add": "+", "sub": "-", "mul": "*", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
          "eq": "==", "ne": "!=", "and": "&", "or": "|", "xor": "^"}
_CALL = {"minimum": "tl.minimum", "maximum": "tl.maximum", "abs": "tl.abs", "exp": "tl.exp",
         "log": "tl.log", "sigmoid": "_sigmoid", "sqrt": "tl.sqrt", "tanh": "_tanh", "where": "tl.where"}
_FLOAT_ARGS = {"truediv", "exp", "log", "tanh", "sigmoid", "sqrt"}


def literal(value) -> str:
    """A Python literal Triton accepts for a constant."""
    if isinstance(value, bool) or isinstance(value, int):
        return repr(value)
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    if math.isnan(value):
        return 'float("nan")'
    return repr(float(value))


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

    def offset(self, load: int, names: dict[int, str]) -> str:
        """The element offset a load node reads, as a Triton expression."""
        cap = self.graph.node(load)["capture"]
        terms = [f"{names[a]} * cap{cap}_s{d}" for d, a in enumerate(self.graph.args(load))]
        return " + ".join(terms) if terms else "0"

    def statements(self, targets: dict[str, str], also: tuple[int, ...] = ()) -> tuple[list[str], dict[int, str]]:
        """Lines assigning each ``variable: output-name`` pair of ``targets``.

        Nodes used once are inlined; shared ones get a ``t<N>`` temporary.
        Also returns the expression of every node computed, ``also`` included.
        """
        variable_of: dict[int, str] = {}
        for variable, output in targets.items():
            variable_of.setdefault(self.graph.outputs[output], variable)
        keep = set(also)
        names: dict[int, str] = {}
        lines = []
        for n in self.graph.order(list(variable_of) + list(also)):
            expr = self._expression(n, names)
            if self._trivial(n):
                names[n] = expr
            elif n in variable_of:
                names[n] = variable_of[n]
                lines.append(f"{names[n]} = {self._strip(expr)}")
            elif n in keep or self.graph.uses(n) > 1:
                names[n] = f"t{n}"
                lines.append(f"t{n} = {self._strip(expr)}")
            else:
                names[n] = f"({expr})"
        for variable, output in targets.items():
            if names[self.graph.outputs[output]] != variable:
                lines.append(f"{variable} = {self._strip(names[self.graph.outputs[output]])}")
        return lines, names

    def _trivial(self, n: int) -> bool:
        return self.graph.op(n) in ("input", "const")

    @staticmethod
    def _strip(expr: str) -> str:
        """Drop one pair of parentheses that encloses all of ``expr``."""
        if not (expr.startswith("(") and expr.endswith(")")):
            return expr
        depth = 0
        for i, char in enumerate(expr):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0 and i < len(expr) - 1:
                return expr
        return expr[1:-1]

    def _as_float(self, n: int, names: dict[int, str]) -> str:
        if self.graph.dtype(n) == "float":
            return self._strip(names[n])
        if self.graph.op(n) == "const":
            return literal(float(self.graph.node(n)["value"]))
        return f"{names[n]}.to(tl.float32)"

    def _expression(self, n: int, names: dict[int, str]) -> str:
        g = self.graph
        attrs = g.node(n)
        op, args = attrs["op"], attrs["args"]
        if op == "input":
            return VARIABLE_OF_INPUT.get(attrs["name"], attrs["name"])
        if op == "const":
            return literal(attrs["value"])
        if op == "load":
            return self._load(n, names)
        if op in _FLOAT_ARGS:
            operands = [self._as_float(a, names) for a in args]
        else:
            operands = [self._strip(names[a]) if op in _CALL else names[a] for a in args]
        if op in _INFIX:
            return f"{operands[0]} {_INFIX[op]} {operands[1]}"
        if op == "truediv":
            return f"{names[args[0]] if g.dtype(args[0]) == 'float' else operands[0]} / {operands[1]}"
        if op == "neg":
            return f"-{operands[0]}"
        if op == "not":
            return f"~{operands[0]}"
        if op in ("floordiv", "mod"):
            kind = "float" if attrs["dtype"] == "float" else "int"
            return f"_{op}_{kind}({self._strip(operands[0])}, {self._strip(operands[1])})"
        if op == "pow":
            return self._pow(args, names)
        return f"{_CALL[op]}({', '.join(operands)})"

    def _pow(self, args: tuple[int, int], names: dict[int, str]) -> str:
        base, exponent = args
        g = self.graph
        if g.is_const(exponent) and float(g.node(exponent)["value"]).is_integer():
            power = int(g.node(exponent)["value"])
            if 0 < abs(power) <= 4:
                product = " * ".join([names[base]] * abs(power))
                return product if power > 0 else f"1.0 / ({product})"
        if g.is_const(exponent, 0.5):
            return f"tl.sqrt({self._as_float(base, names)})"
        return f"tl.exp({self._as_float(exponent, names)} * tl.log({self._as_float(base, names)}))"

    def _load(self, n: int, names: dict[int, str]) -> str:
        cap = self.graph.node(n)["capture"]
        axes = self.index_axes(n)
        masks = [m for axis, m in (("q", "q_valid"), ("kv", "kv_valid")) if axis in axes]
        mask = f", mask={' & '.join(masks)}, other=0" if masks else ""
        value = f"tl.load(cap{cap} + {self.offset(n, names)}{mask})"
        kind = self.graph.captures[cap].kind
        if kind == "float":
            return f"{value}.to(tl.float32)"
        if kind == "bool":
            return f"({value} != 0)"
        return value
