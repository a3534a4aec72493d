"""A call's captured-tensor reads checked against the tensors' sizes, with torch alone.

The kernels read captured tensors without bound checks; :mod:`attngen.runtime.index_ranges` finds, when
a spec compiles, the reads whose index range a call can bound (a read is ``(capture, dim, bounds,
direct)``: see its ``IndexRead``), and a call checks them here before any kernel runs. The source of
this module below its imports is also rendered into the kernel modules that have an entry point, whose
exported ``forward`` refuses the same reads in the same words.
"""

import functools

import torch

from .qkv import kept_extremes, least_and_greatest, values_checkable

INDICES = ("b", "h", "q_idx", "kv_idx")
BY_CONSTANT = ("floordiv", "mod", "mul")  # an expression and a constant
# the IR's ops (attngen/ir/graph.py's OPS) with torch, on tensors of the result's type ("where" and the
# comparisons aside; "to_int": the result type's .to() converts, rounding toward zero), and its types
TORCH_OPS = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "truediv": torch.true_divide,
    "floordiv": lambda a, b: torch.div(a, b, rounding_mode="floor"), "mod": torch.remainder,
    "pow": torch.pow, "minimum": torch.minimum, "maximum": torch.maximum,
    "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "log": torch.log, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "sqrt": torch.sqrt, "cos": torch.cos, "sin": torch.sin, "erf": torch.erf,
    "atan": torch.atan, "log1p": torch.log1p, "expm1": torch.expm1,
    "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne,
    "and": torch.bitwise_and, "or": torch.bitwise_or, "xor": torch.bitwise_xor, "not": torch.bitwise_not,
    "to_int": lambda a: a,
}
_COMPARISONS = ("lt", "le", "gt", "ge", "eq", "ne")
TORCH_TYPES = {"float": torch.float64, "int": torch.int64, "bool": torch.bool}
MAX_FUNCTION_VALUES = 1 << 22  # a function of one index expression is tried at up to this many values
_CHUNK = 1 << 16  # values tried at once


def index_range(bounds, extents, values=None):
    """The least and the greatest value of the expression ``bounds`` describes while each index runs over
    ``range(extents[name])``; None where it reads a captured tensor whose ``values(capture, box)`` (its
    least and greatest value over a box of indices) are unknown."""
    op = bounds[0]
    if op == "affine":
        _, offset, coefficients = bounds
        used = [(c, extents[name] - 1) for c, name in zip(coefficients, INDICES) if c]
        return offset + sum(min(0, c * last) for c, last in used), offset + sum(max(0, c * last) for c, last in used)
    if op == "load":
        box = tuple(index_range(part, extents, values) for part in bounds[2])
        return None if values is None or None in box else values(bounds[1], box)
    inner = index_range(bounds[1], extents, values)
    if inner is None:
        return None
    lo, hi = inner
    if op in BY_CONSTANT:
        c = bounds[2]
        if op == "mul":
            return min(lo * c, hi * c), max(lo * c, hi * c)
        if op == "floordiv":
            return lo // c, hi // c
        if lo // c != hi // c:  # the values pass a multiple of c: c - 1, then 0 are reached
            return 0, c - 1
        return lo % c, hi % c
    other = index_range(bounds[2], extents, values)
    if other is None:
        return None
    lo2, hi2 = other
    if op == "add":
        return lo + lo2, hi + hi2
    if op == "sub":
        return lo - hi2, hi - lo2
    if op == "minimum":
        return min(lo, lo2), min(hi, hi2)
    return max(lo, lo2), max(hi, hi2)


def read_range(bounds, extents, values=None):
    """:func:`index_range`, and for a function of one index expression, ``("function", inner, steps)``
    (e.g. T5's buckets of ``kv_idx - q_idx``), the extremes of ``steps`` over every value of ``inner``
    (:func:`function_range`); None where a call cannot tell, and for those inside a torch.compile trace."""
    if bounds[0] != "function":
        return index_range(bounds, extents, values)
    if torch.compiler.is_compiling():  # tried at every value: not inside a trace
        return None
    return function_range(bounds[2], *index_range(bounds[1], extents))


@functools.lru_cache(maxsize=256)
def function_range(steps, lo, hi):
    """The least and the greatest value of ``steps`` (see attngen.runtime.index_ranges) at every value from
    ``lo`` to ``hi`` of their inner expression; None where one is undefined or there are too many."""
    if hi - lo >= MAX_FUNCTION_VALUES:
        return None
    extremes = []
    for start in range(lo, hi + 1, _CHUNK):
        found = _function_values(steps, torch.arange(start, min(start + _CHUNK - 1, hi) + 1))
        if found is None:
            return None
        extremes += least_and_greatest(found)
    return min(extremes), max(extremes)


def _function_values(steps, inner):
    """``steps`` at each value of ``inner`` (int64) on the CPU, floats rounded to float32 after each op as
    the kernels round them; None where one is undefined: a NaN or infinite float or one out of int64's
    range converted to an int, an integer divided by 0 (``where`` takes the branch it selects, so T5's
    unselected log(0) is harmless)."""
    values, undefined = [], []
    try:
        for step in steps:
            if step[0] == "inner":
                value, bad = inner, torch.tensor(False)
            elif step[0] == "const":
                value, bad = torch.tensor(step[1], dtype=torch.float64 if isinstance(step[1], float) else None), \
                    torch.tensor(False)
            else:
                value, bad = _step(*step, values, undefined)
            values.append(value)
            undefined.append(bad)
    except RuntimeError:  # e.g. an int to a negative int power
        return None
    return None if bool(undefined[-1].any()) else values[-1]


def _step(op, kind, args, values, undefined):
    """(value, undefined) of one op of a function of one index expression over all its values at once."""
    a, bad = [values[i] for i in args], functools.reduce(torch.logical_or, (undefined[i] for i in args))
    dtype = TORCH_TYPES[kind]
    if op == "where":
        value = torch.where(a[0].bool(), a[1].to(dtype), a[2].to(dtype))
        bad = undefined[args[0]] | torch.where(a[0].bool(), undefined[args[1]], undefined[args[2]])
    elif op in _COMPARISONS:
        value = TORCH_OPS[op](*a)
    elif op == "to_int":
        value = a[0].to(dtype)  # rounding toward zero
        if a[0].is_floating_point():
            bad = bad | ~(a[0].abs() < 2.0 ** 63)  # NaN too
    else:
        a = [x.to(dtype) for x in a]
        if op in ("floordiv", "mod") and kind == "int":
            bad = bad | (a[1] == 0)
            a[1] = torch.where(a[1] == 0, 1, a[1])
        value = TORCH_OPS[op](*a)
    return (value.to(torch.float32).to(dtype) if kind == "float" else value), bad


def index_names(bounds):
    """The indices an expression depends on."""
    if bounds[0] == "affine":
        return {name for c, name in zip(bounds[2], INDICES) if c}
    if bounds[0] == "function":
        return index_names(bounds[1])
    if bounds[0] == "load":
        return set().union(*map(index_names, bounds[2]))
    if bounds[0] in BY_CONSTANT:
        return index_names(bounds[1])
    return index_names(bounds[1]) | index_names(bounds[2])


def _loaded(bounds):
    """The captured tensors whose values an expression reads (parts of a load read none)."""
    op = bounds[0]
    if op in ("affine", "function"):
        return set()
    if op == "load":
        return {bounds[1]}
    if op in BY_CONSTANT:
        return _loaded(bounds[1])
    return _loaded(bounds[1]) | _loaded(bounds[2])


def captured_values(captures):
    """``values(capture, box)`` for :func:`index_range`: the least and the greatest value of captured tensor
    ``captures[capture]`` over a box, not found inside a torch.compile trace, while a CUDA graph is captured
    or for a box that leaves the tensor (whose own read is refused)."""
    def values(capture, box):
        tensor = captures[capture]
        if not values_checkable(tensor) or tensor.dim() != len(box) or \
                any(lo < 0 or hi >= n for (lo, hi), n in zip(box, tensor.shape)):
            return None
        return kept_extremes(tensor, box)
    return values


def _labels(captures, call_captures):
    """How an error names each captured tensor: the call's own by its argument, the spec's own tensors
    numbered in the order the spec reads them (the call's left out)."""
    names = {position: name for name, position in call_captures.items()}
    labels, own = [], 0
    for capture in range(len(captures)):
        name = names.get(capture)
        if name is None:
            name, own = f"captured tensor #{own}", own + 1
        labels.append(name)
    return labels


def check_index_ranges(captures, reads, extents, call_captures):
    """Raise ValueError for a read of ``captures`` (the captured tensors, the call's own among them) that
    leaves its tensor at some position of a call whose indices run over ``range(extents[name])``.
    ``call_captures`` maps the name of each of the call's own tensors to its position among the captures;
    their reads, which the call's checks bound, are skipped, as are reads that use an index missing from
    ``extents`` (not bounded: positions in packed sequences) and empty calls."""
    values = captured_values(_live_offsets(captures, reads, call_captures))
    for capture, dim, bounds, direct in reads:
        used = [name for name in INDICES if name in index_names(bounds)]
        if capture in call_captures.values() or any(name not in extents or extents[name] == 0 for name in used):
            continue
        tensor = captures[capture]
        size = tensor.shape[dim]
        if direct is not None:
            if size < extents[direct]:
                raise ValueError(
                    f"{_labels(captures, call_captures)[capture]} of shape {tuple(tensor.shape)} is indexed with "
                    f"{direct} in dim {dim}, which runs to {extents[direct] - 1} in this call, but that dim has "
                    f"{size} entries; give it {extents[direct]} (a [1, ...] tensor does not broadcast when indexed)")
            continue
        found = read_range(bounds, extents, values)
        if found is None:
            continue
        lo, hi = found
        if lo < 0 or hi >= size:
            labels = _labels(captures, call_captures)
            loaded = " and ".join(labels[c] for c in sorted(_loaded(bounds)))
            of = " and ".join(used) + (f" through the values of {loaded}" if loaded else "")
            index = f"an expression of {of.removeprefix(' through ')} that runs from {lo} to {hi} in this call" \
                if of else f"the constant {lo}"
            raise ValueError(
                f"{labels[capture]} of shape {tuple(tensor.shape)} is indexed in dim {dim} with {index}, but "
                f"that dim has {size} entries (the kernels evaluate the mods at every position, masked ones "
                "too, and do not check bounds)")


def _live_offsets(captures, reads, call_captures):
    """``captures`` with a KV cache call's ``q_offset`` as the reads see it: no kernel evaluates a mod for
    a batch entry whose cache is empty (kv_lens 0; it has no key), so its offset, negative by default,
    takes the greatest of the others' (0 if none) instead of widening the positions checked."""
    at = call_captures.get("q_offset")
    if at is None or not any(at in _loaded(bounds) for _, _, bounds, _ in reads) \
            or not values_checkable(captures[at]) or not captures[at].numel():
        return captures
    offsets, live = captures[at], captures[call_captures["kv_lens"]] > 0
    greatest = torch.where(live, offsets, torch.iinfo(offsets.dtype).min).amax()
    captures = list(captures)
    captures[at] = torch.where(live, offsets, torch.where(live.any(), greatest, 0))
    return captures


def check_sequence_reads(captures, reads, positions, heads, total_q):
    """Raise ValueError for a read of ``captures`` (the spec's own captured tensors) that leaves its tensor in
    a call on packed sequences (``positions``: :func:`packed_positions`' tensors; ``total_q`` queries):
    ``reads`` are the spec's own, its mods seeing each sequence as ``b`` and positions within it, checked
    at positions up to the longest sequence's."""
    start_q = positions["start_q"]
    if not reads or not values_checkable(start_q):
        return
    q_lens = torch.diff(start_q, append=start_q.new_tensor([total_q]))
    longest_q, longest_k = torch.stack([q_lens.max(), positions["len_k"].max()]).tolist()  # one read on a GPU
    extents = {"h": heads, "b": q_lens.numel(), "q_idx": longest_q, "kv_idx": longest_k}
    check_index_ranges(captures, reads, extents, {})
