"""Symbolic tracing: run the user's ``score_mod``/``mask_mod`` on proxies.

Each proxy stands for one IR node. Python operators and the supported torch
functions (dispatched through ``__torch_function__``) append nodes to the
graph; indexing a captured tensor with traced indices becomes a ``load`` (indexing only its
leading dimensions gives a :class:`Row`, to index further or reduce with ``torch.dot``).
Anything that needs a concrete value (``if proxy:``, ``int(proxy)``, ``and``)
raises :class:`SpecError` pointing at the user's line.
"""

from __future__ import annotations

import functools
import numbers
import operator
import os
import traceback
from typing import Callable

import torch

from .errors import SpecError
from .functions import COMPOSITE
from .norms import WEIGHT_FAMILIES
from .ir.graph import Capture, Graph

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))

SCORE_INPUTS = ("score", "b", "h", "q_idx", "kv_idx")
MASK_INPUTS = ("b", "h", "q_idx", "kv_idx")

# torch function / method name -> (IR op, reversed operands)
_BINARY = {
    "add": "add", "sub": "sub", "subtract": "sub", "mul": "mul", "multiply": "mul",
    "div": "truediv", "divide": "truediv", "truediv": "truediv", "true_divide": "truediv",
    "floordiv": "floordiv", "floor_divide": "floordiv", "mod": "mod", "remainder": "mod",
    "pow": "pow",
    "lt": "lt", "less": "lt", "le": "le", "less_equal": "le", "gt": "gt", "greater": "gt",
    "ge": "ge", "greater_equal": "ge", "eq": "eq", "ne": "ne", "not_equal": "ne",
    "and": "and", "bitwise_and": "and", "logical_and": "and",
    "or": "or", "bitwise_or": "or", "logical_or": "or",
    "xor": "xor", "bitwise_xor": "xor", "logical_xor": "xor",
}
_REVERSED = {"radd": "add", "rsub": "sub", "rmul": "mul", "rtruediv": "truediv", "rdiv": "truediv",
             "rfloordiv": "floordiv", "rmod": "mod", "rpow": "pow", "rand": "and", "ror": "or", "rxor": "xor"}
_UNARY = {
    "neg": "neg", "negative": "neg", "abs": "abs", "absolute": "abs", "exp": "exp", "log": "log",
    "tanh": "tanh", "sigmoid": "sigmoid", "sqrt": "sqrt", "invert": "not", "bitwise_not": "not",
    "logical_not": "not", "cos": "cos", "sin": "sin", "erf": "erf", "log1p": "log1p", "expm1": "expm1",
    "atan": "atan", "arctan": "atan",
}
# torch dtypes a traced value converts to (``.to(dtype)``, ``.long()``, ...), by the IR type they become
_CASTS = {torch.float32: "float", torch.float64: "float", torch.int32: "int", torch.int64: "int", torch.bool: "bool"}
_KERNEL_DTYPES = {"float": torch.float32, "int": torch.int32, "bool": torch.bool}  # a traced value's .dtype
_CAST_METHODS = {"float": "float", "double": "float", "long": "int", "int": "int", "bool": "bool"}
_LIKE = {"zeros_like": 0, "ones_like": 1}
_SHIFTS = {"bitwise_left_shift": True, "lshift": True, "bitwise_right_shift": False, "rshift": False}
_ROW_LIMIT = 256  # entries of a row that torch.dot / .sum() may reduce (each one a load in every tile)
SUPPORTED_TORCH = sorted(set(_BINARY) | set(_UNARY) | set(_LIKE) | set(COMPOSITE) | {
    "where", "clamp", "clip", "relu", "min", "max", "minimum", "maximum", "floor", "ceil", "full_like", "__getitem__",
    "bitwise_left_shift", "bitwise_right_shift", "dot", "inner", "matmul", "sum", "mean", "amax", "amin"})
# the supported functions that are also tensor methods taking the tensor first (x.where differs)
_METHODS = {name for name in SUPPORTED_TORCH
            if name != "where" and hasattr(torch, name) and hasattr(torch.Tensor, name)}


def _user_frame(frames) -> str:
    """``file:line: code`` of the innermost frame outside attngen and torch."""
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith((_PACKAGE_DIR, _TORCH_DIR)):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return "<unknown location>"


def user_location() -> str:
    """Where in the user's code the current trace step happens."""
    return _user_frame(traceback.extract_stack())


class Tracer:
    """Records the ops applied to proxies into one :class:`Graph`."""

    def __init__(self):
        self.graph = Graph()
        self.function = "score_mod"
        self._captured: dict[int, int] = {}

    def fail(self, message: str) -> SpecError:
        return SpecError(f"{self.function}: {message}\n  at {user_location()}")

    def capture(self, tensor: torch.Tensor) -> int:
        """The capture index of ``tensor``, registering it on first use."""
        key = id(tensor)
        if key not in self._captured:
            if tensor.is_complex():
                raise self.fail(f"captured tensor of dtype {tensor.dtype} is not supported")
            self._captured[key] = len(self.graph.captures)
            self.graph.captures.append(Capture(tensor))
        return self._captured[key]

    def node(self, value) -> int:
        """The IR node for a proxy, a Python or numpy number or a one-element tensor."""
        if isinstance(value, Vector):
            raise self.fail(f"{value} is used as a value (a captured tensor indexed at all but its last dimension, or "
                            "a one-dimensional one, is a vector): index every dimension of the tensor, or reduce the "
                            "vector with torch.dot(a, b), a @ b, .sum(), .mean(), .max() or .min()")
        if isinstance(value, Proxy):
            if value.tracer is not self:
                raise self.fail("a traced value from another trace was used")
            return value.node
        if isinstance(value, (bool, int, float)):
            return self.graph.const(value)
        if isinstance(value, Row):
            raise self.fail(f"{value} is used as a value: index all {value.tensor.dim()} dimensions, or reduce "
                            "its last one with torch.dot(a, b), a @ b or .sum()")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise self.fail(
                    f"a captured tensor of shape {tuple(value.shape)} is used without indexing; "
                    "index it with the traced indices, e.g. bias[h, q_idx, kv_idx]")
            index = tuple(self.graph.const(0) for _ in range(value.dim()))
            return self.graph.load(self.capture(value), index)
        if type(value).__module__ == "numpy":
            if getattr(value, "ndim", None) == 0:  # np.float32(0.5), np.int64(2)
                return self.node(value.item())
            raise self.fail(_NUMPY_REFUSED)
        raise self.fail(f"cannot use a value of type {type(value).__name__} in a traced expression")

    def apply(self, op: str, *args) -> Proxy:
        """``op`` of ``args``: one IR node, or one per entry where an argument is a vector (a :class:`Vector`,
        a row with one dimension left, a one-dimensional captured tensor)."""
        lengths = [self.vector_length(a) for a in args]
        distinct = set(lengths) - {0}
        if len(distinct) > 1:
            raise self.fail(f"vectors of {' and '.join(map(str, sorted(distinct)))} entries in one operation")
        if distinct:
            columns = [self.entries(a) if n else None for a, n in zip(args, lengths)]
            return Vector(self, [self.apply(op, *(a if c is None else c[i] for a, c in zip(args, columns)))
                                 for i in range(distinct.pop())])
        return Proxy(self, self.graph.add(op, tuple(self.node(a) for a in args)))

    def vector_length(self, value) -> int:
        """How many entries ``value`` has as a vector (0: it is not one)."""
        if isinstance(value, Vector):
            return len(value.entries)
        if isinstance(value, Row):
            if value.tensor.dim() - len(value.prefix) > 1:
                self.node(value)  # raises, naming the row
            return value.tensor.shape[-1]
        return value.shape[0] if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() > 1 else 0

    def index(self, tensor: torch.Tensor, index) -> Proxy | Row:
        """``tensor[index]``: a load where every dimension is indexed, a :class:`Row` where only the
        leading ones are (as FlexAttention's vmap allows: ``intervals[image][0]``)."""
        items = index if isinstance(index, tuple) else (index,)
        if len(items) > tensor.dim() or not all(isinstance(i, (Proxy, numbers.Integral)) for i in items):
            raise self.fail(
                f"a captured tensor of shape {tuple(tensor.shape)} must be indexed with at most "
                f"{tensor.dim()} integer or traced indices (no slices), e.g. slopes[h] or bias[h, q_idx - kv_idx]")
        nodes = tuple(self.node(i) for i in items)
        if any(self.graph.dtype(n) == "float" for n in nodes):
            raise self.fail("a captured tensor is indexed with a floating-point value")
        if len(items) < tensor.dim():
            return Row(self, tensor, items)
        return Proxy(self, self.graph.load(self.capture(tensor), nodes))

    def entries(self, row) -> list[Proxy]:
        """The entries of a vector, of a row with one dimension left or of a one-dimensional captured tensor."""
        if isinstance(row, Vector):
            return row.entries
        if isinstance(row, torch.Tensor) and row.dim() == 1:
            row = Row(self, row, ())
        if not isinstance(row, Row) or row.tensor.dim() - len(row.prefix) != 1:
            raise self.fail(f"torch.dot / @ / .sum() reduce a vector: the last dimension of a captured tensor indexed "
                            f"at all the others, e.g. torch.dot(q_rope[b, h, q_idx], k_rope[b, h, kv_idx]); got {row}")
        length = row.tensor.shape[-1]
        if length > _ROW_LIMIT:
            raise self.fail(f"{row} has {length} entries; the kernels reduce at most {_ROW_LIMIT} (each is a load "
                            "per score): a longer product belongs in q and k, as extra head dimensions")
        return [row[i] for i in range(length)]

    def shift(self, x, amount, left: bool) -> Proxy:
        """``x << amount`` / ``x >> amount`` for an int amount: the product with, or the floor of the
        quotient by, 2 ** amount, which they are on two's-complement ints (so the analyses bound them)."""
        if isinstance(amount, Proxy) or not isinstance(amount, int) or not 0 <= amount <= 30:
            raise self.fail("bit shifts take a Python int amount from 0 to 30 (q_idx >> 4); for a traced "
                            "amount multiply or floor-divide by 2 ** amount")
        if self.dtype(x) != "int":
            raise self.fail(f"bit shifts take an integer, not a {self.dtype(x)} value")
        return self.apply("mul" if left else "floordiv", x, 2 ** amount)

    def dtype(self, value) -> str:
        """The IR type of a traced value or constant (of a vector: of its entries)."""
        if isinstance(value, (Vector, Row)):
            return self.dtype(self.entries(value)[0])
        return self.graph.dtype(self.node(value))

    def cast(self, x, kind: str):
        """``x`` converted to the IR type ``kind`` as torch converts it: floats to ints round toward zero,
        booleans become 0 / 1, anything non-zero becomes True."""
        have = self.dtype(x)
        if have == kind:
            return x
        if kind == "bool":
            return self.apply("ne", x, 0)
        if have == "bool":
            return self.apply("where", x, 1.0 if kind == "float" else 1, 0.0 if kind == "float" else 0)
        return self.apply("to_int", x) if kind == "int" else self.apply("mul", x, 1.0)

    def cast_to(self, x, dtype) -> Proxy:
        """``x.to(dtype)`` for a torch dtype of :data:`_CASTS`."""
        if dtype not in _CASTS:
            raise self.fail(f"traced values convert to {', '.join(map(str, _CASTS))}, not {dtype} (kernels compute "
                            "in float32 and 32-bit integers)")
        return self.cast(x, _CASTS[dtype])

    def torch_call(self, func, args, kwargs) -> Proxy:
        """A torch function applied to traced values (through ``__torch_function__``)."""
        if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and not str(func).startswith("aten."):
            raise self.fail(f"the custom op {func} cannot be traced (attngen knows torch's own functions, not what "
                            "a custom op computes): write its math in the mod, e.g. torch.tanh for an approximate tanh")
        if isinstance(func, torch._ops.OpOverload):  # torch.ops.aten.mul.Tensor: the function mul
            func = func.overloadpacket
        name = getattr(func, "__name__", str(func)).strip("_")
        if name.startswith("special_") and name[len("special_"):] in SUPPORTED_TORCH:
            name = name[len("special_"):]  # torch.special.expit's name is special_expit
        kwargs = dict(kwargs or {})
        if kwargs.get("inplace") is False:  # torch.nn.functional's activations pass it along
            del kwargs["inplace"]
        if name in COMPOSITE and isinstance(args[0], (Proxy, Row)):
            try:
                return COMPOSITE[name](*args, **kwargs)
            except TypeError as error:  # an argument the composition does not take
                raise self.fail(f"torch.{name}: {error}") from None
        special = self._SPECIAL.get(name)
        if special is not None:
            result = special(self, name, args, kwargs)
            if result is not None:
                return result
        if kwargs:
            raise self.fail(f"torch.{name} with keyword arguments {sorted(kwargs)} is not supported")
        if name in _UNARY and len(args) == 1:
            return self.apply(_UNARY[name], *args)
        if name in _BINARY and len(args) == 2:
            return self.apply(_BINARY[name], *args)
        if name in _REVERSED and len(args) == 2:
            return self.apply(_REVERSED[name], args[1], args[0])
        raise self.fail(f"torch.{name} cannot be traced; supported: {', '.join(SUPPORTED_TORCH)}")

    # -- torch functions with their own rules: each returns None where its form does not apply ---------
    def _like(self, name, args, kwargs):
        """``zeros_like`` / ``ones_like`` / ``full_like``: a constant of the value's type (or of ``dtype=``), one
        per entry of a vector."""
        fill = _LIKE.get(name, args[1] if len(args) > 1 else kwargs.pop("fill_value", None))
        dtype = kwargs.pop("dtype", None)
        if kwargs or not isinstance(fill, (bool, int, float)) or not (dtype is None or dtype in _CASTS):
            raise self.fail(f"torch.{name} takes a traced value, a number to fill with and a dtype of "
                            f"{', '.join(map(str, _CASTS))}")
        kind = self.dtype(args[0]) if dtype is None else _CASTS[dtype]
        constant = Proxy(self, self.graph.const({"float": float, "int": int, "bool": bool}[kind](fill)))
        length = self.vector_length(args[0])
        return Vector(self, [constant] * length) if length else constant

    def _min_max(self, name, args, kwargs):
        """``torch.minimum`` / ``maximum`` and the two-tensor ``min`` / ``max`` (with an int, torch.min / max
        reduce along a dim); where the two are equal floats, each gets half the gradient, as in torch."""
        if len(args) != 2 or kwargs or (name in ("min", "max") and isinstance(args[1], int)):
            return self._reduce(name, args, kwargs)
        op = "minimum" if name in ("min", "minimum") else "maximum"
        if "float" not in (self.dtype(args[0]), self.dtype(args[1])):
            return self.apply(op, *args)
        a, b = args
        return self.apply("where", self.apply("eq", a, b), (a + b) * 0.5, self.apply(op, a, b))

    def _round(self, name, args, kwargs):
        """``torch.floor`` / ``torch.ceil`` (of an int: the int itself)."""
        if len(args) != 1 or kwargs:
            return None
        x = args[0]
        if self.dtype(x) != "float":
            return x
        return self.apply("floordiv", x, 1.0) if name == "floor" else -self.apply("floordiv", -x, 1.0)

    def _divide(self, name, args, kwargs):
        """``torch.div(a, b, rounding_mode="floor" / "trunc")``."""
        mode = kwargs.get("rounding_mode")
        if len(args) != 2 or list(kwargs) != ["rounding_mode"] or mode not in ("floor", "trunc"):
            return None
        a, b = args
        if mode == "floor":
            return self.apply("floordiv", a, b)
        quotient = self.apply("truediv", a, b)
        if "float" not in (self.dtype(a), self.dtype(b)):
            return self.apply("to_int", quotient)  # toward zero, an int as torch's
        # a float stays a float (no detour through 32-bit ints): the floor above 0, the ceiling below
        return torch.where(quotient < 0, self._round("ceil", (quotient,), {}), self._round("floor", (quotient,), {}))

    def _clamp(self, name, args, kwargs):
        x, lo, hi = (list(args) + [None, None])[:3]
        lo, hi = kwargs.get("min", lo), kwargs.get("max", hi)
        if lo is not None:
            x = self.apply("maximum", x, lo)
        if hi is not None:
            x = self.apply("minimum", x, hi)
        return x

    def _shift(self, name, args, kwargs):
        return self.shift(*args, left=_SHIFTS[name]) if len(args) == 2 and not kwargs else None

    def _dot(self, name, args, kwargs):
        """``torch.dot`` / ``inner`` / ``matmul`` of two rows: the sum of their entries' products."""
        if len(args) != 2 or kwargs:
            return None
        left, right = (self.entries(row) for row in args)
        if len(left) != len(right):
            raise self.fail(f"torch.{name} of rows of {len(left)} and {len(right)} entries")
        return functools.reduce(operator.add, [a * b for a, b in zip(left, right)])

    def _reduce(self, name, args, kwargs):
        """A vector's ``sum`` / ``mean`` / ``max`` / ``min`` (``amax``, ``amin``; ``dim`` 0 or -1 as well)."""
        dim = kwargs.pop("dim", args[1] if len(args) > 1 else None)
        if kwargs or len(args) > 2 or dim not in (None, 0, -1, (0,), (-1,)) or isinstance(args[0], torch.Tensor):
            return None
        if not isinstance(args[0], (Vector, Row)):  # a scalar's reduction is itself
            return args[0] if name in ("sum", "mean", "amax", "amin") or len(args) == 1 else None
        entries = self.entries(args[0])
        if name in ("sum", "mean"):
            total = functools.reduce(operator.add, entries)
            return total / len(entries) if name == "mean" else total
        extreme = functools.reduce(lambda a, b: self.apply("maximum" if name in ("max", "amax") else "minimum", a, b),
                                   entries)
        if name in ("max", "min") or self.dtype(extreme) != "float":
            return extreme  # a tie's gradient to the first entry, as max() / min() under vmap (FlexAttention's)
        # amax / amin: + the tied entries' mean offset from it (0): the value stays exact and, as torch's, the
        # gradient is spread evenly over the tied entries (the extreme's own path cancels: 1 - ties / ties)
        ties = [self.apply("eq", x, extreme) for x in entries]
        count = functools.reduce(operator.add, [self.apply("where", t, 1.0, 0.0) for t in ties])
        offset = functools.reduce(operator.add, [self.apply("where", t, x - extreme, 0.0)
                                                 for t, x in zip(ties, entries)])
        return extreme + offset / count

    def _scaled_add(self, name, args, kwargs):
        """``torch.add`` / ``torch.sub`` with ``alpha=``: the second argument scaled first."""
        if len(args) != 2 or list(kwargs) != ["alpha"]:
            return None
        return self.apply(_BINARY[name], args[0], self.apply("mul", args[1], kwargs["alpha"]))

    def _relu(self, name, args, kwargs):
        # 0 first: at 0 the gradient goes to it, so relu's is 0 there, as torch's
        return self.apply("maximum", 0.0, args[0]) if len(args) == 1 and not kwargs else None

    _SPECIAL = {
        "getitem": lambda self, name, args, kwargs: self.index(*args),
        "where": lambda self, name, args, kwargs: self.apply("where", *args),
        "zeros_like": _like, "ones_like": _like, "full_like": _like,
        **dict.fromkeys(("min", "max", "minimum", "maximum"), _min_max),
        "floor": _round, "ceil": _round, "div": _divide, "divide": _divide,
        "clamp": _clamp, "clip": _clamp, "relu": _relu,
        **dict.fromkeys(("add", "sub", "subtract"), _scaled_add),
        **dict.fromkeys(_SHIFTS, _shift), "dot": _dot, "inner": _dot, "matmul": _dot,
        **dict.fromkeys(("sum", "mean", "amax", "amin"), _reduce),
    }


class Proxy:
    """A traced scalar value; Python operators and torch functions record IR ops."""

    __slots__ = ("tracer", "node")

    def __init__(self, tracer: Tracer, node: int):
        self.tracer = tracer
        self.node = node

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _torch_function(func, args, kwargs)

    def __bool__(self):
        raise self.tracer.fail(
            "Python control flow on a traced value (if / while / and / or / not / bool()) cannot be compiled; "
            "use torch.where(cond, a, b) and the operators & | ~ instead")

    def _number(self, *_):
        raise self.tracer.fail(
            "a traced value was converted to a Python number (float(), int(), .item(), math.<function>()): it has no "
            "value until the kernels run; use torch's functions (torch.exp(s), not math.exp(s)) and .float() / .long()")

    def _index(self, *_):
        raise self.tracer.fail(
            "a traced value was used as a Python index or count (a list or tuple index, range(), a slice): it has "
            "no value until the kernels run; index a captured torch tensor instead (torch.tensor(values)[q_idx])")

    def _scalar(self, *_):
        raise self.tracer.fail("traced values are scalars: they have no len() and cannot be iterated")

    def __round__(self, *_):
        raise self.tracer.fail("Python's round() takes no traced value (nor a torch tensor): use torch.round(x), "
                               "with decimals=n for n digits")

    __int__ = __float__ = _number
    __index__ = _index
    __len__ = __iter__ = _scalar
    __hash__ = object.__hash__

    def __getitem__(self, _):
        raise self.tracer.fail("traced values are scalars and cannot be indexed")

    def __getattr__(self, name):
        if name == "where":  # x.where(condition, y) is torch.where(condition, x, y)
            return lambda condition, other: self.tracer.apply("where", condition, self, other)
        if name == "masked_fill":
            return lambda mask, value: self.tracer.apply("where", mask, value, self)
        if name in _METHODS:  # x.pow(2), x.clamp_min(0), x.div(y, rounding_mode="floor"): torch.<name>(x, ...)
            return lambda *a, **kw: self.tracer.torch_call(getattr(torch, name), (self, *a), kw)
        if name in _CAST_METHODS:
            return lambda: self.tracer.cast(self, _CAST_METHODS[name])
        if name in ("new_ones", "new_zeros", "new_full"):
            return functools.partial(self._new, name)
        if name == "device":  # for x.new_ones((), device=x.device): traced scalars live in the kernels
            return None
        if name == "dtype":  # as the kernels hold it: torch.finfo(score.dtype).min is float32's
            return _KERNEL_DTYPES[self.tracer.dtype(self)]
        if name in ("to", "type", "type_as"):
            return self._to
        if name in ("item", "tolist", "numpy"):
            self._number()
        if name.startswith("__array"):  # numpy asking for an array
            raise self.tracer.fail(_NUMPY_REFUSED)
        if name.endswith("_") and (name[:-1] in _METHODS or name[:-1] in ("masked_fill", "where")):
            raise self.tracer.fail(f"in-place methods such as .{name}() are not traced: write s = s.{name[:-1]}(...) "
                                   "(or the operator) instead")
        raise self.tracer.fail(f"traced values have no method {name!r} (conversions: .to(dtype), "
                               f"{', '.join(f'.{m}()' for m in _CAST_METHODS)}; functions: torch.<name>(x) for "
                               f"the supported torch functions)")

    def _new(self, name, size=(), *args, **kwargs):
        """``x.new_ones(())`` / ``new_zeros`` / ``new_full((), fill)``: a constant of x's type or of ``dtype``, as
        FlexAttention's and_masks / or_masks / noop_mask begin their results."""
        if tuple(size) != ():
            raise self.tracer.fail(f"traced values are scalars: .{name}(()) makes one, not .{name}({tuple(size)})")
        for ignored in ("device", "requires_grad", "layout", "pin_memory"):
            kwargs.pop(ignored, None)
        return self.tracer.torch_call(getattr(torch, name[len("new_"):] + "_like"), (self, *args), kwargs)

    def _to(self, dtype=None, **kwargs):
        """``x.to(dtype)`` / ``x.type(dtype)`` / ``x.to(other)`` / ``x.type_as(other)``; a device is not a
        conversion of a scalar."""
        dtype = kwargs.pop("dtype", dtype)
        if isinstance(dtype, (Proxy, torch.Tensor)):
            dtype = dtype.dtype
        if kwargs or not isinstance(dtype, torch.dtype):
            raise self.tracer.fail("traced values convert with .to(dtype) only (a torch dtype, no device)")
        return self.tracer.cast_to(self, dtype)

    def __repr__(self):
        return f"Proxy(%{self.node}: {self.tracer.graph.describe(self.node)})"


_NUMPY_REFUSED = ("numpy cannot compute on traced values: use torch's functions (torch.exp(s), not np.exp(s)) and "
                  "capture torch tensors (torch.as_tensor(array)), not numpy arrays")
# numpy's ufuncs for Python's binary operators: a numpy scalar on the left (np.float32(0.5) * s) calls them
_NUMPY_OPERATORS = {"add": "add", "subtract": "sub", "multiply": "mul", "divide": "truediv",
                    "true_divide": "truediv", "floor_divide": "floordiv", "remainder": "mod", "power": "pow",
                    "bitwise_and": "and", "bitwise_or": "or", "bitwise_xor": "xor", "less": "lt",
                    "less_equal": "le", "greater": "gt", "greater_equal": "ge", "equal": "eq", "not_equal": "ne"}


def _array_ufunc(self, ufunc, method, *inputs, **kwargs):
    """numpy's side of ``numpy_scalar <op> traced``: the op Python's operator records; any other numpy function
    of a traced value is refused."""
    if method == "__call__" and not kwargs and len(inputs) == 2 and ufunc.__name__ in _NUMPY_OPERATORS:
        return self.tracer.apply(_NUMPY_OPERATORS[ufunc.__name__], *inputs)
    raise self.tracer.fail(_NUMPY_REFUSED)


def _binary(op: str, reverse: bool = False):
    if reverse:
        return lambda self, other: self.tracer.apply(op, other, self)
    return lambda self, other: self.tracer.apply(op, self, other)


class Row:
    """A captured tensor indexed at its leading dimensions only (``intervals[image]``,
    ``q_rope[b, h, q_idx]``): index it further or, with one dimension left, use it as a :class:`Vector`
    of loads (``torch.dot(q_rope[b, h, q_idx], k_rope[b, 0, kv_idx])``)."""

    __slots__ = ("tracer", "tensor", "prefix")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _torch_function(func, args, kwargs)

    def __init__(self, tracer: Tracer, tensor: torch.Tensor, prefix: tuple):
        self.tracer, self.tensor, self.prefix = tracer, tensor, prefix

    def __getitem__(self, index):
        return self.tracer.index(self.tensor, self.prefix + (index if isinstance(index, tuple) else (index,)))

    def __matmul__(self, other):
        return self.tracer.torch_call(torch.matmul, (self, other), {})

    def __rmatmul__(self, other):
        return self.tracer.torch_call(torch.matmul, (other, self), {})

    def __getattr__(self, name):  # row.sum(), row.max(), row.mul(2): as torch.<name>(row, ...)
        if name in _METHODS:
            return lambda *a, **kw: self.tracer.torch_call(getattr(torch, name), (self, *a), kw)
        raise AttributeError(name)

    def __len__(self):
        return self.tensor.shape[len(self.prefix)]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def _value(self, *_):
        self.tracer.node(self)  # raises, naming the row

    __bool__ = __int__ = __float__ = __index__ = _value

    def __repr__(self):
        return (f"a captured tensor of shape {tuple(self.tensor.shape)} indexed at {len(self.prefix)} of its "
                f"{self.tensor.dim()} dimensions")


# Python's operators on traced values and rows (a row with one dimension left is a vector there)
for _cls in (Proxy, Row):
    for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor"):
        setattr(_cls, f"__{_name}__", _binary(_name))
        setattr(_cls, f"__r{_name}__", _binary(_name, reverse=True))
    for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
        setattr(_cls, f"__{_name}__", _binary(_name))
    for _name, _left in (("lshift", True), ("rshift", False)):
        setattr(_cls, f"__{_name}__", lambda self, amount, _left=_left: self.tracer.shift(self, amount, _left))
        setattr(_cls, f"__r{_name}__", lambda self, x, _left=_left: self.tracer.shift(x, self, _left))
    _cls.__array_ufunc__ = _array_ufunc
    _cls.__neg__ = lambda self: self.tracer.apply("neg", self)
    _cls.__pos__ = lambda self: self
    _cls.__abs__ = lambda self: self.tracer.apply("abs", self)
    _cls.__invert__ = lambda self: self.tracer.apply("not", self)


class Vector(Proxy):
    """Values over a captured tensor's last dimension (``w * x`` for a one-dimensional ``w``,
    ``torch.relu(w1 * x + b1)``): each op applies to every entry, one IR node each, and
    ``torch.dot`` / ``@`` / ``.sum()`` / ``.mean()`` / ``.max()`` / ``.min()`` reduce them to one value (a
    small MLP of a position, as FIRE's relative-position bias)."""

    __slots__ = ("entries",)

    def __init__(self, tracer: Tracer, entries: list[Proxy]):
        if len(entries) > _ROW_LIMIT:
            raise tracer.fail(f"a vector of {len(entries)} entries; the kernels compute at most {_ROW_LIMIT} per score")
        super().__init__(tracer, None)
        self.entries = entries

    def __len__(self):
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, index):
        if isinstance(index, int):
            return self.entries[index]
        raise self.tracer.fail("a vector's entries are taken at Python ints (vector[0]), not at traced values")

    __matmul__, __rmatmul__ = Row.__matmul__, Row.__rmatmul__

    def __repr__(self):
        return f"a vector of {len(self.entries)} entries"


def _torch_function(func, args, kwargs):
    tracer = next(a.tracer for a in _flatten(args) if isinstance(a, (Proxy, Row)))  # a Vector is a Proxy
    return tracer.torch_call(func, args, kwargs)


def _flatten(items):
    for item in items:
        if isinstance(item, (tuple, list)):
            yield from _flatten(item)
        else:
            yield item


def _call(tracer: Tracer, function: Callable, name: str, inputs: tuple[str, ...]) -> int:
    """Trace ``function`` on proxies of the named graph inputs; return its result node."""
    tracer.function = name
    graph = tracer.graph
    args = [Proxy(tracer, graph.input(i, "float" if i in ("score", "logit") else "int")) for i in inputs]
    try:
        result = function(*args)
    except SpecError:
        raise
    except Exception as error:  # the user's function failed on proxies
        raise SpecError(f"{name} could not be traced: {type(error).__name__}: {error}\n"
                        f"  at {_user_frame(traceback.extract_tb(error.__traceback__))}") from error
    if result is None:
        raise SpecError(f"{name} returned None: is its return statement missing?")
    return tracer.node(result)


def _score(tracer: Tracer, score_mod: Callable | None, normalization, key_count, name: str) -> tuple[int, int]:
    """``score_mod`` of the input score, and that then taken by the normalization's logits (or weight)."""
    graph = tracer.graph
    score = graph.input("score", "float")
    if score_mod is not None:
        score = _call(tracer, score_mod, name, SCORE_INPUTS)
        if graph.dtype(score) == "bool":
            raise SpecError("score_mod must return a number, but it returned a boolean; "
                            "boolean conditions belong in mask_mod")
    if normalization is None:
        return score, score
    modded = score
    weighted = normalization.family in WEIGHT_FAMILIES
    method = normalization.weight if weighted else normalization.logits
    count = "n_kept" if normalization.count == "unmasked" else "n_keys"
    label = f"{type(normalization).__name__}.{method.__name__}"
    if count == "n_keys" and key_count is not None:  # the row's keys are not simply LK
        return modded, _call(tracer, lambda h, b, q_idx: method(Proxy(tracer, modded), h, key_count(b, q_idx)),
                             label, ("h", "b", "q_idx"))
    return modded, _call(tracer, lambda h, n: method(Proxy(tracer, modded), h, n), label, ("h", count))


def trace(score_mod: Callable | None, mask_mod: Callable | None, normalization=None,
          expectations: list[tuple[str, Callable]] = (), key_count: Callable | None = None,
          second_score_mod: Callable | None = None, two_streams: bool = False, logit: bool = False) -> Graph:
    """Trace the spec's functions into one graph with outputs ``score``, ``mask``
    and ``exp0``, ``exp1``, ... (one per row expectation).

    ``score`` is what the kernel normalizes: ``score_mod``'s result, then the
    normalization's ``logits`` or, for WEIGHT_FAMILIES, its ``weight`` of it, which may use the input
    ``n_keys`` or ``n_kept`` (``key_count(b, q_idx)``, when given, stands for ``n_keys``: the number of keys
    of the row's sequence). With ``two_streams`` (differential attention) the output ``score2`` is the
    second stream's score: ``second_score_mod``
    (default ``score_mod``) of the same input, then the same logits. With ``logit`` the output ``logit``
    is ``score_mod``'s result alone (the logit of WEIGHT_FAMILIES, whose ``score`` is a weight). Each
    expectation function is traced on the input ``logit`` (the kernel passes
    ``score`` there).
    """
    tracer = Tracer()
    graph = tracer.graph
    streams = [score_mod] + ([second_score_mod or score_mod] if two_streams else [])
    (modded, score), *others = [_score(tracer, mod, normalization, key_count,
                                       f"score_mod{'' if i == 0 else ' (second stream)'}")
                                for i, mod in enumerate(streams)]
    if mask_mod is None:
        mask = graph.const(True)
    else:
        mask = _call(tracer, mask_mod, "mask_mod", MASK_INPUTS)
        if graph.dtype(mask) != "bool":
            raise SpecError("mask_mod must return a boolean (a comparison, or & | ~ of comparisons), "
                            f"but it returned a value of type {graph.dtype(mask)}")
    graph.outputs = {"score": score, "mask": mask, **({"score2": others[0][1]} if two_streams else {}),
                     **({"logit": modded} if logit else {})}
    for e, (name, g) in enumerate(expectations):
        node = _call(tracer, g, f"expectation {name!r}", ("logit", "b", "h", "q_idx", "kv_idx"))
        learnable = [n for n in graph.order([node]) if graph.op(n) == "load"
                     and graph.captures[graph.node(n)["capture"]].differentiable]
        if learnable:
            raise SpecError(f"expectation {name!r} reads a captured tensor that requires grad; gradients "
                            "through expectation functions are not supported yet: detach it")
        graph.outputs[f"exp{e}"] = node
    return graph


def trace_feature_map(feature_map: Callable) -> Graph:
    """Trace a linear attention feature map ``phi(x)`` (elementwise, no captured tensors) into a
    graph with output ``score`` of the input ``score`` (the kernels' ``qk``: a tile of q or k)."""
    tracer = Tracer()
    graph = tracer.graph
    phi = _call(tracer, feature_map, "feature_map", ("score",))
    if graph.dtype(phi) == "bool":
        raise SpecError("feature_map must return a number, but it returned a boolean")
    if graph.captures:
        raise SpecError("feature_map reads a captured tensor; feature maps are elementwise functions of "
                        "one value (use decay= for per-head parameters)")
    graph.outputs = {"score": phi, "mask": graph.const(True)}
    return graph
