"""Per-row statistics computed inside the kernels, each differentiable.

Request them with ``AttentionSpec(stats=(...))`` and read them from
``out, stats = attn(q, k, v, return_stats=True)``:

* ``"lse"``: ``log sum_j exp(l_j)`` (plus ``exp(sink)`` with a sink), ``-inf`` on empty rows;
* ``"max"``: ``max_j l_j`` over the kept keys, ``-inf`` on empty rows;
* ``"entropy"``: ``H = -sum_j p_j log p_j = lse - sum_j p_j l_j``, 0 on empty rows; with a sink, of the
  distribution over the keys and the sink (``- p_sink * sink`` more); stick-breaking's, of the keys and the
  stick they leave;
* ``expectation(g, name)``: ``E = sum_j p_j g(l_j, b, h, q_idx, kv_idx)``, 0 on empty rows, with the weights
  ``p`` the output takes (what the output would be for the values ``g_j``), not divided by their sum where it
  is not 1 (stick-breaking's, softpick's, signed softmax's, sigmoid's, ReLU's);
* ``"col_sum"`` / ``col_sum(reduce_heads=...)``: ``c_j = sum_i p_ij``, ``[B, Hq (or Hkv), Lk]``;
* ``pooled(block_q, block_k, reduce)``: the weights pooled over blocks,
  ``[B, Hq, ceil(Lq/block_q), ceil(Lk/block_k)]`` ("mean" over the block's
  positions, "sum", or forward-only "max");
* ``"support"``: how many keys weigh more than 0 (float32 counts, no gradient),
  for the normalizations whose weights have exact zeros (``exact_zeros``: sparsemax and entmax,
  softpick, ReLU).

``l`` are the logits the normalization takes (the modded scores; for the
elementwise and normalized families, score_mod's result, of which they take a
weight). Row statistics are shaped ``[B, Hq, Lq]``. All but the support are
defined for softmax-family normalizations (entropy, expectations and maps
without an affine output); the max, the maps and expectations for every normalization (without an affine
output); the entropy also for sparsemax / entmax, normalized weights and stick-breaking (with the stick its
keys leave as one more outcome).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from .scalars import integer

ROW_STATS = ("lse", "max", "entropy", "support")
# the normalizations whose weights are a distribution of their own, which the "entropy" is defined for beyond the
# softmax family's: the kernels sum it themselves (a softmax's comes from its lse and mean logit); stick-breaking's
# counts the stick its keys leave as one more outcome (as a softmax's counts its sink)
ENTROPY_FAMILIES = ("threshold", "normalized", "stick_breaking")
ENTROPY_MEAN = "entropy:mean_logit"  # the expectation of l the kernels compute for the entropy
STICK_ENTROPY = "entropy:stick"  # the expectation that is stick-breaking's entropy


def stick_entropy_term(score, b, h, q_idx, kv_idx):
    """``g(l) = h(beta) / beta``, ``h`` the binary entropy of a key's share ``beta = sigmoid(l)`` of the stick
    that reaches it: ``sum_j p_j g(l_j) = sum_j (stick reaching j) h(beta_j)``, the entropy of the keys' weights
    and the stick left over (the chain rule of entropy over the breaks). ``g = softplus(-l) + e^-l softplus(l)``
    in terms of ``a = |l|`` and ``y = e^-a``, finite for every logit."""
    a = torch.abs(score)
    y = torch.exp(-a)
    log1p_y = torch.log1p(y)
    ratio = torch.where(y > 1e-4, log1p_y / y, 1.0 - 0.5 * y)  # log1p(y) / y
    return torch.where(score >= 0, log1p_y + y * (a + log1p_y), a + log1p_y + ratio)


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


class MapStat:
    """Attention weights summed, averaged or maxed over (block_q x block_k) blocks.

    ``block_q=None`` pools all query rows; ``reduce_heads`` also sums the query
    heads of each GQA group (output heads: Hkv).
    """

    REDUCTIONS = ("sum", "mean", "max")

    def __init__(self, name: str, block_q: int | None, block_k: int, reduce: str, reduce_heads: bool = False):
        for label, size in (("block_q", block_q), ("block_k", block_k)):
            if size is not None and (integer(size) is None or size < 1):
                raise ValueError(f"{label} must be a positive int, got {size!r}")
        if reduce not in self.REDUCTIONS:
            raise ValueError(f"reduce must be one of {self.REDUCTIONS}, got {reduce!r}")
        if not name.isidentifier():
            raise ValueError(f"stat name must be a Python identifier, got {name!r}")
        self.name, self.block_q, self.block_k = name, integer(block_q), integer(block_k)
        self.reduce, self.reduce_heads = reduce, reduce_heads

    def __repr__(self) -> str:
        return (f"MapStat({self.name!r}, block_q={self.block_q}, block_k={self.block_k}, "
                f"reduce={self.reduce!r}, reduce_heads={self.reduce_heads})")


def col_sum(reduce_heads: bool = False, name: str = "col_sum") -> MapStat:
    """``c_j = sum_i p_ij``: the attention mass each key receives, [B, Hq (or Hkv), Lk]."""
    return MapStat(name, None, 1, "sum", reduce_heads)


def pooled(block_q: int, block_k: int, reduce: str = "mean", name: str = "pooled") -> MapStat:
    """The weights pooled over blocks: [B, Hq, ceil(Lq/block_q), ceil(Lk/block_k)]."""
    return MapStat(name, block_q, block_k, reduce)


def expectations_moved(stats, move: Callable) -> tuple:
    """``stats`` with each row expectation's ``g(score, b, h, q_idx, kv_idx)`` rewritten by ``move``, the
    rewrite a call applies to its score_mod (so ``g`` sees the indices the score_mod sees)."""
    return tuple(Expectation(move(s.g), s.name) if isinstance(s, Expectation) else s for s in stats)


def expectation(g: Callable, name: str) -> Expectation:
    """A row expectation statistic ``sum_j p_ij g(l_ij, ...)`` named ``name``."""
    return Expectation(g, name)


def stat_name(stat) -> str:
    return stat if isinstance(stat, str) else stat.name


def map_stats(stats) -> list[MapStat]:
    """The block-pooled maps (col_sum included) among ``stats``, in order."""
    return [s for s in stats if isinstance(s, MapStat)]


def forward_only(stats) -> dict[str, str]:
    """The statistics among ``stats`` without a gradient (the pooled maxima), by name, each with a sentence
    that says so."""
    return {stat.name: f"the pooled map {stat.name!r} (reduce='max') is forward-only"
            for stat in map_stats(stats) if stat.reduce == "max"}


def kernel_expectations(stats, normalization) -> list[tuple[str, Callable]]:
    """The expectations the kernels accumulate for ``stats``: (name, g) pairs (a softmax's entropy takes
    the mean logit; sparsemax / entmax and normalized-weight kernels sum their entropy themselves)."""
    found = [(s.name, s.g) for s in stats if isinstance(s, Expectation)]
    if "entropy" in stats and normalization.family == "softmax":
        found.append((ENTROPY_MEAN, lambda score, b, h, q_idx, kv_idx: score))
    if "entropy" in stats and normalization.family == "stick_breaking":
        found.append((STICK_ENTROPY, stick_entropy_term))
    return found


def assemble(requested, lse, row_max, expectations: dict, maps: dict, support=None, sink=None,
             entropy=None) -> Stats:
    """The statistics a user asked for, from what the kernels (or the reference) computed.

    ``maps`` holds each MapStat's [B, H, rows, cols] map; col_sum-style maps
    (``block_q=None``) lose their row axis. ``sink``: the softmax's sink logit (a float or per-head
    tensor), whose weight ``exp(sink - lse)`` the entropy counts. ``entropy``: computed directly
    (sparsemax / entmax, normalized weights), else stick-breaking's expectation or from the softmax's lse and
    mean logit.
    """
    entropy = expectations.get(STICK_ENTROPY) if entropy is None else entropy
    values = {"lse": lse, "max": row_max, "support": support, "entropy": entropy, **expectations}
    for stat in map_stats(requested):
        values[stat.name] = maps[stat.name][:, :, 0] if stat.block_q is None else maps[stat.name]
    if "entropy" in requested and entropy is None:
        entropy = lse - expectations[ENTROPY_MEAN]
        if sink is not None:  # the sink's share p_s = exp(sink - lse) adds -p_s log p_s = p_s (lse - sink)
            sink = sink[:, None] if isinstance(sink, torch.Tensor) else sink
            entropy = entropy - torch.exp(sink - lse) * sink
        values["entropy"] = torch.where(torch.isneginf(lse), torch.zeros_like(lse), entropy)
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
