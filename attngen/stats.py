"""Per-row statistics computed inside the kernels, each differentiable.

Request them with ``AttentionSpec(stats=(...))`` and read them from
``out, stats = attn(q, k, v, return_stats=True)``:

* ``"lse"``: ``log sum_j exp(l_j)`` (plus ``exp(sink)`` with a sink), ``-inf`` on empty rows;
* ``"max"``: ``max_j l_j`` over the kept keys, ``-inf`` on empty rows;
* ``"entropy"``: ``H = -sum_j p_j log p_j = lse - sum_j p_j l_j``, 0 on empty rows;
* ``expectation(g, name)``: ``E = sum_j p_j g(l_j, b, h, q_idx, kv_idx)``, 0 on empty rows.

``l`` are the logits the softmax normalizes (the modded scores). All are
shaped ``[B, Hq, Lq]`` and defined for softmax-family normalizations without
an affine output; the entropy also needs no sink.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

ROW_STATS = ("lse", "max", "entropy")
ENTROPY_MEAN = "entropy:mean_logit"  # the expectation of l the kernels compute for the entropy


class Expectation:
    """``E_i = sum_j p_ij g(l_ij, b, h, q_idx, kv_idx)``; ``g`` is traced like a score_mod."""

    def __init__(self, g: Callable, name: str):
        if not callable(g):
            raise TypeError(f"expectation(g, ...) needs a function g(score, b, h, q_idx, kv_idx), "
                            f"got {type(g).__name__}")
        try:
            inspect.signature(g).bind("score", "b", "h", "q_idx", "kv_idx")
        except TypeError:
            raise TypeError(f"expectation function {name!r} must take (score, b, h, q_idx, kv_idx), "
                            f"its signature is {inspect.signature(g)}") from None
        if not name.isidentifier() or name in ROW_STATS:
            raise ValueError(f"expectation name must be a Python identifier other than {ROW_STATS}, got {name!r}")
        self.g, self.name = g, name

    def __repr__(self) -> str:
        return f"expectation({getattr(self.g, '__name__', 'g')}, name={self.name!r})"


def expectation(g: Callable, name: str) -> Expectation:
    """A row expectation statistic ``sum_j p_ij g(l_ij, ...)`` named ``name``."""
    return Expectation(g, name)


def stat_name(stat) -> str:
    return stat.name if isinstance(stat, Expectation) else stat


def kernel_expectations(stats) -> list[tuple[str, Callable]]:
    """The expectations the kernels accumulate for ``stats``: (name, g) pairs."""
    found = [(s.name, s.g) for s in stats if isinstance(s, Expectation)]
    if "entropy" in stats:
        found.append((ENTROPY_MEAN, lambda score, b, h, q_idx, kv_idx: score))
    return found


def assemble(requested, lse, row_max, expectations: dict) -> Stats:
    """The statistics a user asked for, from what the kernels (or the reference) computed."""
    values = {"lse": lse, "max": row_max, **expectations}
    if "entropy" in requested:
        values["entropy"] = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse - expectations[ENTROPY_MEAN])
    return Stats(**{stat_name(s): values[stat_name(s)] for s in requested})


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
