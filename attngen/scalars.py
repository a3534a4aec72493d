"""Numbers among the arguments: Python's and numpy's scalars alike (``np.float32(0.5)``,
``np.int64(3)``), bools never. Each check reads its argument through these and keeps the Python
number, so that specs, cache keys and generated code see one spelling of each value."""

from __future__ import annotations

import numbers


def integer(value) -> int | None:
    """``value`` as a Python int if it is an integer, else None."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


def real(value) -> int | float | None:
    """``value`` as a Python int (an integer) or float (another real number), else None."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return None


def sizes(name: str, least: int, **given: int) -> tuple[int, ...]:
    """The sizes ``given`` as Python ints, in order; refuses one that is not an int (numpy's included) of at
    least ``least``, naming ``name`` and the argument."""
    ints = {label: integer(value) for label, value in given.items()}
    for label, value in ints.items():
        if value is None or value < least:
            raise ValueError(f"{name}: {label} must be {'a positive int' if least else 'an int >= 0'}, "
                             f"got {given[label]!r}")
    return tuple(ints.values())
