"""Per-row statistics returned next to the attention output."""

from __future__ import annotations

import torch

SUPPORTED = ("lse",)


class Stats:
    """The statistics of one attention call, as attributes (``stats.lse``)."""

    def __init__(self, **tensors: torch.Tensor):
        self._tensors = dict(tensors)

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self.__dict__["_tensors"][name]
        except KeyError:
            raise AttributeError(f"no statistic {name!r}; requested: {', '.join(self._tensors) or 'none'}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._tensors)

    def __repr__(self) -> str:
        return "Stats(" + ", ".join(f"{k}={tuple(v.shape)}" for k, v in self._tensors.items()) + ")"
