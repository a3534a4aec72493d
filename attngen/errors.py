"""Exceptions raised for user mistakes, and where warnings point."""

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class SpecError(ValueError):
    """An attention spec, or a function inside it, cannot be compiled."""


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn``, called by the caller of this function, that points at the
    first frame outside attngen: the user's line, however deep inside attngen the warning is raised."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
