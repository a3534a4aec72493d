"""Properties of attention that need no reference: each runs the kernels twice and compares.

They catch whole classes of bugs (a wrong code path for masked tiles, the GQA
head mapping, row normalizers, batch indexing) even where the reference itself
would share a misunderstanding. Each property takes a spec and a
:class:`~attngen.testing.Case` and returns comparisons, or ``[]`` when it does
not apply to that spec or case (see :data:`PROPERTIES`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .. import masks, stats as stats_module
from ..runtime.compiled import compile as compile_spec
from ..spec import AttentionSpec
from .cases import Case
from .compare import FLOORS, Comparison, magnitude, max_error

ROW_STATS = ("lse", "max", "entropy")
REFERENCE = "reference"  # the name of the property that compares with the float64 reference


def _run(spec: AttentionSpec, q, k, v) -> dict[str, torch.Tensor]:
    out, stats = compile_spec(spec)(q, k, v, return_stats=True, dropout_p=0.0)  # the math, not the noise
    return {"out": out, **{name: getattr(stats, name) for name in stats.names()}}


def agreement(a: dict, b: dict, dtype, names=None) -> list[Comparison]:
    """``a`` and ``b`` (two runs) agree on ``names`` (default: all)."""
    return [Comparison(name, max_error(a[name], b[name]), FLOORS.get(dtype, 1e-3) * max(1.0, magnitude(b[name])))
            for name in names or a]


def _mask(spec: AttentionSpec, extra) -> AttentionSpec:
    user = spec.mask_mod
    mask = extra if user is None else (lambda b, h, i, j: user(b, h, i, j) & extra(b, h, i, j))
    return dataclasses.replace(spec, mask_mod=mask)


def _uses(spec: AttentionSpec, name: str) -> bool:
    """Whether the traced spec reads the index ``name`` (``b``, ``kv_idx``, ...) anywhere."""
    graph = compile_spec(spec).graph
    return any(graph.depends_on(node, name) for node in graph.outputs.values())


def always_true_mask(spec: AttentionSpec, case: Case) -> list[Comparison]:
    """Anding a mask that is always True (but not known to be) changes nothing."""
    q, k, v = case.tensors(requires_grad=False)
    always = _mask(spec, lambda b, h, q_idx, kv_idx: q_idx >= 0)
    return agreement(_run(always, q, k, v), _run(spec, q, k, v), case.dtype)


def window_covering_everything(spec: AttentionSpec, case: Case) -> list[Comparison]:
    """Anding a sliding window at least as long as the sequences changes nothing."""
    q, k, v = case.tensors(requires_grad=False)
    reach = max(case.q_len, case.kv_len)
    wide = _mask(spec, masks.sliding_window(reach, reach))
    return agreement(_run(wide, q, k, v), _run(spec, q, k, v), case.dtype)


def last_query_of_causal(spec: AttentionSpec, case: Case) -> list[Comparison]:
    """With Lq = Lk, the last query under ``causal`` sees every key: its row equals the uncausal one."""
    q, k, v = dataclasses.replace(case, q_len=case.kv_len).tensors(requires_grad=False)
    causal, plain = _run(_mask(spec, masks.causal), q, k, v), _run(spec, q, k, v)
    names = ["out"] + [n for n in causal if n in ROW_STATS]
    last = [{n: run[n][:, :, -1] for n in names} for run in (causal, plain)]
    return agreement(*last, case.dtype)


def key_permutation(spec: AttentionSpec, case: Case) -> list[Comparison]:
    """Without kv_idx in the spec, permuting keys and values together leaves out and row stats unchanged."""
    if _uses(spec, "kv_idx") or stats_module.map_stats(spec.stats) \
            or stats_module.kernel_expectations(spec.stats, spec.normalization):
        return []
    q, k, v = case.tensors(requires_grad=False)
    order = torch.randperm(case.kv_len, generator=torch.Generator().manual_seed(case.seed))
    return agreement(_run(spec, q, k[:, :, order], v[:, :, order]), _run(spec, q, k, v), case.dtype)


def rows_sum_to_one(spec: AttentionSpec, case: Case) -> list[Comparison]:
    """The weights (as a fused full map) of a softmax without sink or affine output, and of sparsemax /
    entmax, sum to 1 on rows with a kept key and to 0 on the others (not differential attention's, which has
    no maps)."""
    norm = spec.normalization
    softmax = norm.family == "softmax" and norm.sink is None and norm.affine is None
    if not (softmax or norm.family == "threshold") or spec.differential is not None:
        return []
    row_stat = "lse" if softmax else "support"  # finite lse, or a key of nonzero weight: the row has keys
    mapped = dataclasses.replace(spec, stats=(row_stat, stats_module.pooled(1, 1, "sum", name="weights")))
    q, k, v = case.tensors(requires_grad=False)
    got = _run(mapped, q, k, v)
    sums = got["weights"].sum(-1)
    has_keys = torch.isfinite(got["lse"]) if softmax else got["support"] > 0
    expected = torch.where(has_keys, torch.ones_like(sums), torch.zeros_like(sums))
    return [Comparison("row sums", max_error(sums, expected), FLOORS[torch.float32] * 10)]


def row_shift(spec: AttentionSpec, case: Case) -> list[Comparison]:
    """Adding a per-row constant to the scores leaves a softmax (with no sink) or an entmax unchanged."""
    if spec.normalization.family not in ("softmax", "threshold") or spec.normalization.sink is not None:
        return []
    user = spec.score_mod

    def shifted(s, b, h, q_idx, kv_idx):
        return (s if user is None else user(s, b, h, q_idx, kv_idx)) + 0.5 * (q_idx % 7) + 0.25 * h
    q, k, v = case.tensors(requires_grad=False)
    moved = _run(dataclasses.replace(spec, score_mod=shifted, stats=()), q, k, v)
    return agreement(moved, _run(dataclasses.replace(spec, stats=()), q, k, v), case.dtype)


def gqa_is_repeated_heads(spec: AttentionSpec, case: Case) -> list[Comparison]:
    """Grouped-query attention equals repeating each key/value head over its group."""
    if case.kv_heads == case.q_heads:
        return []
    group = case.q_heads // case.kv_heads
    q, k, v = case.tensors(requires_grad=False)
    grouped = _run(spec, q, k, v)
    names = ["out"] + [n for n in grouped if n in ROW_STATS]
    repeated = _run(spec, q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
    return agreement(grouped, repeated, case.dtype, names)


def batch_split(spec: AttentionSpec, case: Case) -> list[Comparison]:
    """Without b in the spec, running each batch entry alone gives the same rows."""
    if case.batch < 2 or _uses(spec, "b"):
        return []
    q, k, v = case.tensors(requires_grad=False)
    whole = _run(spec, q, k, v)
    parts = [_run(spec, q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i in range(case.batch)]
    joined = {name: torch.cat([p[name] for p in parts]) for name in whole}
    return agreement(joined, whole, case.dtype)


PROPERTIES: dict[str, Callable[[AttentionSpec, Case], list[Comparison]]] = {
    "always-true mask": always_true_mask,
    "window >= length": window_covering_everything,
    "last causal row": last_query_of_causal,
    "keys permuted": key_permutation,
    "rows sum to 1": rows_sum_to_one,
    "row shift": row_shift,
    "GQA = repeated heads": gqa_is_repeated_heads,
    "batch split": batch_split,
}
