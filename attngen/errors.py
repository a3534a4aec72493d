"""Exceptions raised for user mistakes."""


class SpecError(ValueError):
    """An attention spec, or a function inside it, cannot be compiled."""
