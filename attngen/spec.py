"""``AttentionSpec``: what a user writes to describe an attention variant."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import stats as stats_module
from .errors import SpecError
from .norms import WEIGHT_FAMILIES, Normalization, Softmax
from .qkv import dropout_rate
from .scalars import integer, real


def _check_arity(fn: Callable, name: str, params: tuple[str, ...]) -> None:
    if not callable(fn):
        raise SpecError(f"{name} must be a function {name}({', '.join(params)}), got {type(fn).__name__}")
    try:
        inspect.signature(fn).bind(*params)
    except TypeError:
        raise SpecError(f"{name} must take {len(params)} positional arguments ({', '.join(params)}), "
                        f"but its signature is {inspect.signature(fn)}") from None
    except ValueError:  # builtins without a signature: checked when traced
        pass


@dataclass(frozen=True)
class AttentionSpec:
    """An attention variant.

    Args:
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` (FlexAttention's
            signature); ``score`` is already multiplied by ``scale``.
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``; True keeps a key.
        normalization: how each row of scores becomes weights (``norms.Softmax()``).
        scale: multiplies ``q @ k^T`` (any finite number); ``None`` means ``1 / sqrt(Dqk)``.
        stats: per-row statistics returned with ``return_stats=True``;
            ``None`` means ``("lse",)`` for the softmax family and ``()`` for
            elementwise normalizations (which have no row normalizer).
        dropout_p: the probability of zeroing each normalized weight (the kept
            ones are scaled by ``1 / (1 - dropout_p)``); a call's ``dropout_p=``
            overrides it. Statistics describe the weights before dropout.
        differential: ``lam`` (a float or a per-head tensor, learnable with
            ``requires_grad``) makes this differential attention (Ye et al.
            2024): q and k are split into halves ``[Q1 | Q2]``, ``[K1 | K2]``
            and the weights are ``softmax(S1) - lam * softmax(S2)`` over the
            same keys, mask and values; ``scale`` defaults to ``1/sqrt(Dqk/2)``.
        second_score_mod: the second stream's score_mod (default: ``score_mod``).
        top_k: keep only each row's ``top_k`` largest logits (top-k attention; the keys tied with the
            ``top_k``-th largest too, and every key of a row with at most ``top_k`` finite logits): the
            others are masked before the normalization. Normalizations of logits (not the elementwise or
            normalized weights) without an affine output; the kernels find each row's cut-off with up to
            32 passes of bisection over its keys before the forward pass.
    """

    score_mod: Callable | None = None
    mask_mod: Callable | None = None
    normalization: Normalization = field(default_factory=Softmax)
    scale: float | None = None
    stats: tuple[str, ...] | None = None
    dropout_p: float = 0.0
    differential: float | torch.Tensor | None = None
    second_score_mod: Callable | None = None
    top_k: int | None = None

    def __post_init__(self):
        if self.score_mod is not None:
            _check_arity(self.score_mod, "score_mod", ("score", "b", "h", "q_idx", "kv_idx"))
        if self.mask_mod is not None:
            _check_arity(self.mask_mod, "mask_mod", ("b", "h", "q_idx", "kv_idx"))
        if not isinstance(self.normalization, Normalization):
            raise SpecError(f"normalization must be an attngen.norms object such as norms.Softmax(), "
                            f"got {self.normalization!r}")
        row_stats = self.normalization.family == "softmax"
        if self.scale is not None:
            scale = real(self.scale)
            if scale is None or not math.isfinite(scale):
                raise SpecError(f"scale must be a finite number or None, got {self.scale!r}")
            object.__setattr__(self, "scale", scale)
        try:
            object.__setattr__(self, "dropout_p", dropout_rate(self.dropout_p))
        except ValueError as error:
            raise SpecError(str(error)) from None
        _check_differential(self)
        _check_top_k(self)
        if self.stats is None:
            stats = ("lse",) if row_stats and self.differential is None else ()
        else:
            single = (str, stats_module.Expectation, stats_module.MapStat)
            stats = (self.stats,) if isinstance(self.stats, single) else tuple(self.stats)
            stats = tuple(stats_module.col_sum() if s == "col_sum" else s for s in stats)
        _check_stats(stats, self.normalization)
        object.__setattr__(self, "stats", stats)

    def describe(self) -> list[str]:
        """Human-readable lines: the source of each function and the settings."""
        second = [*_source("second_score_mod", self.second_score_mod),
                  f"differential = {_show(self.differential)}"] if self.differential is not None else []
        weight_fn = getattr(self.normalization, "fn", None)  # Elementwise's and Normalized's function
        return [*_source("score_mod", self.score_mod), *second, *_source("mask_mod", self.mask_mod),
                f"normalization = {self.normalization!r}", *(_source("fn", weight_fn) if weight_fn else []),
                f"scale = {'1/sqrt(Dqk)' if self.scale is None else repr(self.scale)}",
                f"stats = {self.stats!r}"] + ([f"dropout_p = {self.dropout_p!r}"] if self.dropout_p else []) \
            + ([f"top_k = {self.top_k!r}"] if self.top_k is not None else [])


def _check_differential(spec: AttentionSpec) -> None:
    """Differential attention's parameter and what it combines with."""
    if spec.second_score_mod is not None:
        if spec.differential is None:
            raise SpecError("second_score_mod is the second stream of differential attention: set differential=lam")
        _check_arity(spec.second_score_mod, "second_score_mod", ("score", "b", "h", "q_idx", "kv_idx"))
    if spec.differential is None:
        return
    lam = spec.differential
    if isinstance(lam, torch.Tensor):
        if not lam.is_floating_point() or lam.dim() > 1:
            raise SpecError(f"differential must be a finite float or a per-head float tensor (lambda), got a "
                            f"{lam.dtype} tensor of shape {tuple(lam.shape)}")
    elif real(lam) is None or not math.isfinite(lam):
        raise SpecError(f"differential must be a finite float or a per-head float tensor (lambda), got {lam!r}")
    else:
        object.__setattr__(spec, "differential", real(lam))
    norm = spec.normalization
    if norm.family != "softmax" or norm.sink is not None or norm.affine is not None:
        raise SpecError(f"differential attention subtracts two softmaxes; its normalization must be a softmax "
                        f"without sink or affine output, got {norm!r}")
    if spec.stats not in (None, ()):
        raise SpecError(f"differential attention has no statistics yet; got stats={spec.stats!r}")


def takes_top_k(normalization: Normalization) -> bool:
    """Whether ``top_k`` applies to ``normalization``: one of logits (not the elementwise or normalized
    weights) without an affine output."""
    return normalization.family not in WEIGHT_FAMILIES and normalization.affine is None


def _check_top_k(spec: AttentionSpec) -> None:
    """Top-k attention's k and the normalizations it keeps a row's largest logits of."""
    if spec.top_k is None:
        return
    top_k = integer(spec.top_k)
    if top_k is None or top_k < 1:
        raise SpecError(f"top_k must be a positive int (how many of each row's largest logits to keep), "
                        f"got {spec.top_k!r}")
    object.__setattr__(spec, "top_k", top_k)
    norm = spec.normalization
    if not takes_top_k(norm) or spec.differential is not None:
        raise SpecError(f"top_k keeps a row's largest logits: its normalization must take logits (the softmax "
                        f"family, softpick, signed softmax, sparsemax / entmax, stick-breaking), without affine "
                        f"output or differential streams, got {norm!r}"
                        + (" with differential" if spec.differential is not None else ""))


def _check_stats(stats: tuple, normalization: Normalization) -> None:
    """Reject unknown, duplicate, or (for this normalization) undefined statistics."""
    for stat in stats:
        if not isinstance(stat, (stats_module.Expectation, stats_module.MapStat)) \
                and stat not in stats_module.ROW_STATS:
            raise SpecError(f"unsupported stat {stat!r}; supported: {', '.join(stats_module.ROW_STATS)}, "
                            "'col_sum', attngen.stats.expectation(g, name), col_sum(...) and pooled(...)")
    names = [stats_module.stat_name(s) for s in stats]
    if len(set(names)) != len(names):
        raise SpecError(f"stats names must be unique, got {names}")
    norm = type(normalization).__name__
    if "support" in names and not normalization.exact_zeros:
        raise SpecError(f"the support stat counts the keys of nonzero weight: defined for Sparsemax, Entmax, "
                        f"Softpick and ReLU, whose weights have exact zeros, not for {norm}")
    maps = [n for n, s in zip(names, stats) if isinstance(s, stats_module.MapStat)]
    of_any = ("support", "max") + (("entropy",) if normalization.family in stats_module.ENTROPY_FAMILIES else ()) \
        + tuple(n for n, s in zip(names, stats) if isinstance(s, stats_module.Expectation))
    of_softmax = [n for n in names if n not in of_any and n not in maps]
    if of_softmax and normalization.family != "softmax":
        raise SpecError(f"stats {of_softmax} are not defined for {norm}: they are statistics of a softmax "
                        f"(the {normalization.family} family has no log-sum-exp); use stats=()")
    needs_distribution = [n for n, s in zip(names, stats)
                          if n == "entropy" or isinstance(s, (stats_module.Expectation, stats_module.MapStat))]
    if needs_distribution and normalization.affine is not None:
        raise SpecError(f"stats {needs_distribution} need a probability distribution, which {norm}'s affine "
                        "output is not")


def _source(name: str, fn: Callable | None) -> list[str]:
    if fn is None:
        return [f"{name} = None"]
    label = getattr(fn, "name", None) or getattr(fn, "__qualname__", repr(fn))
    if getattr(getattr(fn, "fn", None), "__module__", None) == "attngen.masks":
        return [f"{name} = {label}"]  # a mask of attngen.masks, whose name spells it out
    try:
        lines = inspect.getsource(getattr(fn, "fn", fn)).strip().splitlines()
    except (OSError, TypeError):
        return [f"{name} = {label}"]
    return [f"{name} = {label}:"] + [f"    {line}" for line in lines]


def _show(value) -> str:
    return f"tensor{list(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
