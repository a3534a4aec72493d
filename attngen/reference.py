"""The oracle: attention of a spec with the full score matrix materialized.

Plain torch ops at the inputs' dtype (use float64 in tests); torch autograd
gives the backward, including gradients of captured tensors.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .inputs import check_inputs
from .linear import LinearAttentionSpec, LinearState
from .norms import WEIGHT_FAMILIES, Normalization
from .spec import AttentionSpec
from . import stats as stats_module


def _indices(shape, device) -> list[torch.Tensor]:
    """b, h, q_idx, kv_idx as int64 tensors broadcastable to ``shape`` [B, H, Lq, Lk]."""
    return [torch.arange(size, device=device).view([-1 if d == i else 1 for d in range(4)])
            for i, size in enumerate(shape)]


def _each(mod, *indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mod`` of each entry of the 1-d tensors ``indices`` (``dtype`` where there are none), as FlexAttention
    applies mods (torch.vmap): the mod sees 0-d tensors, so ``table[i]`` of a 2-d captured tensor is a row,
    as in the kernels."""
    if indices[0].numel() == 0:
        return indices[0].new_zeros(0, dtype=dtype)
    device = indices[0].device
    return torch.vmap(lambda *entry: torch.as_tensor(mod(*entry), device=device))(*indices)


def scores(q, k, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Modded scores [B, Hq, Lq, Lk] and the boolean mask of kept entries.

    score_mod runs on the kept entries alone (the others are 0), as the kernels use it: a mod that is
    undefined where the mask drops the entry (``log(q_idx - kv_idx + 1)`` above a causal diagonal) would
    give NaN there, and autograd would carry ``0 * NaN`` from those entries into its captured tensors'
    gradients."""
    shape = check_inputs(q, k, k)
    scale = spec.scale if spec.scale is not None else 1.0 / math.sqrt(shape.qk_dim)
    k = k.repeat_interleave(shape.q_heads // shape.kv_heads, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    full = s.shape
    device = q.device
    b, h, q_idx, kv_idx = _indices(full, device)
    keep = torch.ones(full, dtype=torch.bool, device=device)
    if spec.mask_mod is not None:
        keep = _each(spec.mask_mod, *(t.expand(full).reshape(-1) for t in (b, h, q_idx, kv_idx)),
                     dtype=torch.bool).view(full)
    if spec.score_mod is not None:
        kept = keep.nonzero(as_tuple=True)
        modded = _each(spec.score_mod, *(t.expand(full)[kept] for t in (s, b, h, q_idx, kv_idx)), dtype=s.dtype)
        s = s.new_zeros(full).index_put(kept, modded.to(q.dtype))
    return s, keep


def _per_head(value, like: torch.Tensor):
    """A normalization parameter broadcastable against [B, H, Lq, Lk] tensors."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype).reshape(1, -1, 1, 1) if value.dim() == 1 else value.to(like.dtype)
    return value


def _softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's log-sum-exp and softmax, from exp(logits - the row's max): also exact where |lse| is so
    large that it rounds log(sum) away (a row of scores -1e300 has weights 1 / n, which exp(logits - lse)
    and torch.logsumexp's gradient would make 1); rows of -inf give lse -inf, weights 0 and no NaN."""
    if logits.shape[-1] == 0:  # no keys
        return logits.new_full(logits.shape[:-1], -math.inf), logits
    m = logits.amax(-1, keepdim=True).detach()
    e = torch.exp(logits - torch.where(torch.isneginf(m), torch.zeros_like(m), m))
    total = e.sum(-1, keepdim=True)
    some = total > 0
    safe = torch.where(some, total, torch.ones_like(total))
    lse = torch.where(some, m + torch.log(safe), torch.full_like(total, float("-inf")))
    return lse.squeeze(-1), e / safe


def top_k_keep(logits: torch.Tensor, keep: torch.Tensor, k: int) -> torch.Tensor:
    """``keep`` without the keys whose logit is below their row's ``k``-th largest kept one (those tied with
    it stay, and every key of a row with at most ``k`` finite kept logits). The cut-off is piecewise
    constant: no gradient flows through it."""
    if logits.shape[-1] <= k:
        return keep
    kth = torch.where(keep, logits.detach(), float("-inf")).topk(k, dim=-1).values[..., -1:]
    return keep & ~(logits < kth)


def weights(s: torch.Tensor, keep: torch.Tensor, normalization: Normalization, top_k: int | None = None):
    """Attention weights [B, H, Lq, Lk] of modded scores, lse and the logits (the modded scores themselves
    for the elementwise and normalized families, which take a weight of each; lse None but for softmax);
    ``top_k``: the normalization of each row's ``top_k`` largest logits alone."""
    h = torch.arange(s.shape[1], device=s.device).view(1, -1, 1, 1)
    if normalization.count == "unmasked":  # rows with no kept key have no weights to scale
        n = keep.sum(-1, keepdim=True).clamp(min=1).to(s.dtype)
    else:
        n = torch.tensor(float(s.shape[-1]), dtype=s.dtype, device=s.device)
    if normalization.family in WEIGHT_FAMILIES:
        w = torch.where(keep, normalization.weight(s, h, n), torch.zeros_like(s))
        if normalization.family == "normalized":
            w = w / (w.sum(-1, keepdim=True) + normalization.eps)
        return w, None, s
    raw_logits = normalization.logits(s, h, n)
    if top_k is not None:  # the keys below the row's top_k-th largest logit are masked
        keep = top_k_keep(raw_logits, keep, top_k)
    if normalization.family == "threshold":
        return entmax(raw_logits, keep, _per_head(normalization.alpha, raw_logits)), None, raw_logits
    if normalization.family == "stick_breaking":
        return stick_breaking(raw_logits, keep), None, raw_logits
    if normalization.family == "rectified":
        return softpick(raw_logits, keep, normalization.eps), None, raw_logits
    if normalization.family == "signed":
        return signed_softmax(raw_logits, keep), None, raw_logits
    logits = torch.where(keep, raw_logits, float("-inf"))
    if normalization.sink is None:
        lse, p = _softmax(logits)
    else:
        sink = torch.broadcast_to(torch.as_tensor(_per_head(normalization.sink, s), dtype=s.dtype, device=s.device),
                                  (*s.shape[:3], 1))
        lse, p = _softmax(torch.cat([logits, sink], dim=-1))
        p = p[..., :-1]
    if normalization.affine is not None:
        alpha, beta = (_per_head(x, s) for x in normalization.affine)
        p = alpha * p + beta * keep.to(s.dtype)
    return p, lse, raw_logits


def stick_breaking(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``p_j = sigmoid(z_j) * prod_{k kept, k > j} (1 - sigmoid(z_k))`` along the last axis, in log space."""
    leave = torch.where(keep, torch.nn.functional.logsigmoid(-z), torch.zeros_like(z))
    later = leave.flip(-1).cumsum(-1).flip(-1) - leave  # sum over k > j
    return torch.where(keep, torch.exp(torch.nn.functional.logsigmoid(z) + later), torch.zeros_like(z))


def softpick(z: torch.Tensor, keep: torch.Tensor, eps: float) -> torch.Tensor:
    """``relu(exp(z_j) - 1) / (sum_k |exp(z_k) - 1| + eps)`` over the kept, finite entries of the last axis,
    every term scaled by ``exp(-m)``, ``m`` the row's largest such entry or 0 if larger."""
    live = keep & (z > float("-inf"))
    top = _row_max(z, live).unsqueeze(-1).clamp(min=0)
    floor = torch.exp(-top)
    e = torch.where(live, torch.exp(torch.where(live, z, top) - top) - floor, torch.zeros_like(z))
    # relu: no gradient at e = 0 (clamp would pass it), as in the kernels
    return torch.relu(e) / (e.abs().sum(-1, keepdim=True) + eps * floor)


def signed_softmax(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``sign(z_j) exp(|z_j|) / sum_k exp(|z_k|)`` over the kept entries of the last axis that are not -inf."""
    live = keep & (z > float("-inf"))
    magnitude = torch.where(live, z.abs(), float("-inf"))
    lse = torch.logsumexp(magnitude, dim=-1, keepdim=True)
    weights = torch.exp(magnitude - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse))
    return torch.where(live, torch.sign(z) * weights, torch.zeros_like(z))


def entmax(z: torch.Tensor, keep: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """alpha-entmax of ``z`` over the kept entries of its last axis (0 elsewhere, and on rows keeping
    none); ``alpha`` a float or a tensor broadcastable against ``z``. The threshold comes from bisection
    to the dtype's precision; its gradient from one Newton step written with torch ops, which at the
    solution is the implicit function's derivative."""
    power = 1.0 / (alpha - 1)
    live = keep & (z != float("-inf"))  # a key score_mod drops weighs 0 and passes alpha no gradient (0 * inf)
    x = torch.where(live, (alpha - 1) * torch.where(live, z, 0.0), float("-inf"))

    def weights(tau):
        u = torch.relu(x - tau)  # no gradient where u = 0 (clamp would pass it), as in the kernels
        return u ** power, torch.where(u > 0, u ** (power - 1), torch.zeros_like(u))

    with torch.no_grad():
        top = _row_max(x, keep).unsqueeze(-1)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        lo, hi = top - 1, top  # the sum of the weights is >= 1 at lo and < 1 at hi
        for _ in range(200):
            mid = (lo + hi) / 2
            above = weights(mid)[0].sum(-1, keepdim=True) >= 1
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    p, w = weights(lo)
    slope = w.sum(-1, keepdim=True)
    tau = lo + (alpha - 1) * (p.sum(-1, keepdim=True) - 1) / torch.where(slope > 0, slope, torch.ones_like(slope))
    return torch.where(keep, weights(tau)[0], torch.zeros_like(z))


def pool(p: torch.Tensor, stat: stats_module.MapStat, kv_heads: int) -> torch.Tensor:
    """The weights [B, H, Lq, Lk] pooled over ``stat``'s blocks: [B, H', rows, cols]."""
    B, H, Lq, Lk = p.shape
    if stat.reduce_heads:
        p = p.view(B, kv_heads, H // kv_heads, Lq, Lk).sum(2)
    block_q = max(Lq, 1) if stat.block_q is None else stat.block_q
    rows, cols = (1 if stat.block_q is None else -(-Lq // block_q)), -(-Lk // stat.block_k)
    padded = torch.nn.functional.pad(p, (0, cols * stat.block_k - Lk, 0, rows * block_q - Lq))
    blocks = padded.view(B, p.shape[1], rows, block_q, cols, stat.block_k)
    if stat.reduce == "max":
        return blocks.amax(dim=(3, 5))
    total = blocks.sum(dim=(3, 5))
    if stat.reduce == "sum":
        return total
    return total / _positions(Lq, stat.block_q, Lk, stat.block_k, p)


def _positions(Lq: int, block_q: int | None, Lk: int, block_k: int, like: torch.Tensor) -> torch.Tensor:
    """How many (query, key) positions each block of an [Lq, Lk] grid holds (``block_q=None``: one block
    of all rows): [rows, cols], ``like``'s dtype and device."""
    rows = torch.arange(1 if block_q is None else -(-Lq // block_q), device=like.device)
    row_counts = torch.full_like(rows, Lq) if block_q is None else (Lq - rows * block_q).clamp(max=block_q)
    col_counts = (Lk - torch.arange(-(-Lk // block_k), device=like.device) * block_k).clamp(max=block_k)
    return (row_counts[:, None] * col_counts[None, :]).to(like.dtype)


def _row_max(logits, keep):
    """Each row's largest kept logit; -inf for a row without one, also when there is no key at all."""
    kept = torch.nn.functional.pad(torch.where(keep, logits, float("-inf")), (0, 1), value=float("-inf"))
    return torch.amax(kept, dim=-1)


def _max_stat(logits, keep):
    """The "max" statistic: each row's largest kept logit (-inf without one), its gradient all the first
    key's of those holding it, as the kernels' (and torch.max(dim)'s); torch.amax would split it."""
    top = _row_max(logits, keep).unsqueeze(-1)
    holds = keep & (logits == top)
    first = holds & (holds.cumsum(-1) == 1)
    return torch.where(first.any(-1), torch.where(first, logits, 0.0).sum(-1), top[..., 0])


def _max_margin(logits, keep):
    """Each row's gap between its two largest kept logits (inf with fewer than two kept keys)."""
    kept = torch.nn.functional.pad(torch.where(keep, logits, float("-inf")), (0, 2), value=float("-inf"))
    top = torch.topk(kept, 2, dim=-1).values
    return torch.where(torch.isfinite(top[..., 1]), top[..., 0] - top[..., 1], float("inf"))


def _top_k_margin(logits, keep, k: int):
    """Each row's gap between its ``k``-th largest kept logit and the largest kept one below it, relative to
    ``max(1, |k-th|)`` (inf where there is none): where rounding may keep another set of keys."""
    kept = torch.nn.functional.pad(torch.where(keep, logits, float("-inf")), (0, k), value=float("-inf"))
    kth = kept.topk(k, dim=-1).values[..., -1:]
    below = torch.where(kept < kth, kept, float("-inf")).amax(-1)
    kth = kth[..., 0]
    return torch.where(torch.isfinite(kth) & torch.isfinite(below), (kth - below) / kth.abs().clamp(min=1.0),
                       float("inf"))


def _x_log_x(x):
    """``x log x``, 0 where ``x <= 0`` (and no gradient there)."""
    return torch.where(x > 0, x * torch.log(torch.where(x > 0, x, 1.0)), 0.0)


def _row_stats(spec: AttentionSpec, p, lse, logits, keep, kv_heads: int, margins: bool) -> stats_module.Stats:
    """The requested statistics of the materialized weights (``margins``: and the max's and top-k's, see
    :func:`attention`)."""
    row_max = _max_stat(logits, keep) if "max" in spec.stats else None
    expectations = {}
    # g of the kept keys' logits alone (as score_mod's, see scores): a key score_mod drops (-inf) has no weight
    # and adds nothing, where g is infinite too (0 log 0 = 0 in an entropy), nor NaN to the gradients;
    # stick-breaking's entropy comes from the weights themselves (below), not from its kernels' expectation
    found = [(name, g) for name, g in stats_module.kernel_expectations(spec.stats, spec.normalization)
             if name != stats_module.STICK_ENTROPY]
    if found:
        live = keep & (logits != -math.inf) if spec.normalization.drops_minus_inf() else keep
        live = live.nonzero(as_tuple=True)
        at = [logits[live]] + [t.expand(p.shape)[live] for t in _indices(p.shape, p.device)]
    for name, g in found:
        values = p.new_zeros(p.shape).index_put(live, _each(g, *at, dtype=p.dtype).to(p.dtype))
        expectations[name] = (p * values).sum(-1)
    maps = {stat.name: pool(p, stat, kv_heads) for stat in stats_module.map_stats(spec.stats)}
    support = (p > 0).sum(-1).to(p.dtype) if "support" in spec.stats else None
    # sparsemax / entmax, normalized weights: -sum p log p over the keys of nonzero weight (the others add 0,
    # and no gradient); stick-breaking: and the stick left over, 1 - sum p, as one more outcome
    entropy = None
    if "entropy" in spec.stats and spec.normalization.family in stats_module.ENTROPY_FAMILIES:
        entropy = -_x_log_x(p).sum(-1)
        if spec.normalization.family == "stick_breaking":
            entropy = entropy - _x_log_x(1.0 - p.sum(-1))
    stats = stats_module.assemble(spec.stats, lse, row_max, expectations, maps, support, spec.normalization.sink,
                                  entropy)
    extra = {}
    if margins and row_max is not None:
        extra["max_margin"] = _max_margin(logits, keep)
    if margins and spec.top_k is not None:
        extra["top_k_margin"] = _top_k_margin(logits, keep, spec.top_k)
    return stats_module.Stats(**{name: getattr(stats, name) for name in stats.names()}, **extra) if extra else stats


def _differential_weights(q, k, spec: AttentionSpec) -> torch.Tensor:
    """``softmax(S1) - lam * softmax(S2)`` over the halves of q and k (differential attention)."""
    half = q.shape[-1] // 2
    first = dataclasses.replace(spec, differential=None, second_score_mod=None, stats=())
    second = dataclasses.replace(first, score_mod=spec.second_score_mod or spec.score_mod)
    s1, keep = scores(q[..., :half], k[..., :half], first)
    s2, _ = scores(q[..., half:], k[..., half:], second)
    p1, p2 = (weights(s, keep, spec.normalization)[0] for s in (s1, s2))
    return p1 - _per_head(spec.differential, s1) * p2


def _shifted(spec: AttentionSpec, batch, query) -> AttentionSpec:
    """``spec`` run on one batch entry (or sequence) alone: its mods and row expectations see batch
    index ``b + batch`` and query positions ``q_idx + query``."""
    def shift_score(score):
        return None if score is None else (lambda s, b, h, i, j: score(s, b + batch, h, i + query, j))
    mask = spec.mask_mod
    return dataclasses.replace(
        spec, score_mod=shift_score(spec.score_mod), second_score_mod=shift_score(spec.second_score_mod),
        mask_mod=None if mask is None else (lambda b, h, i, j: mask(b + batch, h, i + query, j)),
        stats=stats_module.expectations_moved(spec.stats, shift_score))


def _maps_summed(spec: AttentionSpec) -> AttentionSpec:
    """``spec`` with its "mean" maps summed instead (averaged by :func:`_maps_over_cache` over the cache)."""
    def summed(stat):
        if isinstance(stat, stats_module.MapStat) and stat.reduce == "mean":
            return stats_module.MapStat(stat.name, stat.block_q, stat.block_k, "sum", stat.reduce_heads)
        return stat
    return dataclasses.replace(spec, stats=tuple(summed(s) for s in spec.stats))


def _maps_over_cache(spec: AttentionSpec, piece: tuple, Lq: int, cache_len: int) -> tuple:
    """One batch entry's ``(out, stats)`` with its maps over the whole cache: the weights past its keys
    are 0 (the columns padded), and "mean" maps divide their sums by the positions of each block of the
    [Lq, cache_len] grid."""
    out, stats = piece
    values = {name: getattr(stats, name) for name in stats.names()}
    for stat in stats_module.map_stats(spec.stats):
        cols = -(-cache_len // stat.block_k)
        values[stat.name] = torch.nn.functional.pad(values[stat.name], (0, cols - values[stat.name].shape[-1]))
        if stat.reduce == "mean":
            values[stat.name] = values[stat.name] / _positions(Lq, stat.block_q, cache_len,
                                                               stat.block_k, out)
    return out, stats_module.Stats(**values)


def _joined(pieces: list, out_dim: int, stat_dim: int, return_stats: bool):
    """One result from per-batch (or per-sequence) ``(out, stats)`` pieces."""
    out = torch.cat([o for o, _ in pieces], out_dim)
    if not return_stats:
        return out
    names = pieces[0][1].names()
    return out, stats_module.Stats(**{n: torch.cat([getattr(st, n) for _, st in pieces], stat_dim) for n in names})


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """A paged cache ``[num_pages, H, page_size, D]`` as the contiguous ``[B, H, max_pages * page_size, D]``
    one its ``block_table`` [B, max_pages] describes (entries past a sequence may be anything)."""
    gathered = pages[block_table.long().clamp(0, pages.shape[0] - 1)]  # [B, max_pages, H, page_size, D]
    return gathered.permute(0, 2, 1, 3, 4).flatten(2, 3)


def _dropout_slices(keep: torch.Tensor | None, shape: tuple[int, int, int, int]):
    """``(batches, rows, keys) -> the part of the dropout mask`` of a call whose kernel sees
    ``[B, Hq, Lq, Lk]`` = ``shape`` (a cache's full length, a packed call's tokens as one batch entry)."""
    if keep is None:
        return lambda batches, rows, keys: None
    keep = torch.broadcast_to(keep, shape)
    return lambda batches, rows, keys: keep[batches, :, rows, keys]


def attention(q, k, v, spec: AttentionSpec | None = None, *, return_stats: bool = False, kv_lens=None,
              q_offset=None, block_table=None, cu_seqlens_q=None, cu_seqlens_k=None, dropout_keep=None,
              dropout_p: float = 0.0, margins: bool = False):
    """``out`` (and ``Stats`` with return_stats) of ``spec`` on q, k, v, materialized.

    ``kv_lens`` ([B], or an int for every entry): k and v are caches of which batch entry ``b`` holds
    ``kv_lens[b]`` keys; queries sit at ``q_idx + q_offset[b]`` (default ``kv_lens - Lq``); with
    ``block_table`` they are pages of a paged cache (see :func:`gather_pages`). ``cu_seqlens_q``/``_k``
    ([B + 1]): q, k, v are sequences packed as ``(tokens, heads, dim)``; row statistics come back
    as ``[heads, tokens]``. Both are computed one batch entry or sequence at a time, as separate
    calls (pooled maps, whose blocks would straddle them, are refused). ``dropout_keep`` (bool,
    broadcastable to [B, Hq, Lq, Lk] of the call's kernel: a cache's full length, or for packed
    sequences [1, Hq, q tokens, k tokens]) applies dropout of probability ``dropout_p`` with that mask.
    ``margins``: a spec's "max" statistic comes with a ``max_margin`` one, each row's gap between its
    two largest kept logits (inf with fewer than two), where rounding may pick another arg-max; a top-k spec
    with a ``top_k_margin``, each row's gap below its k-th largest kept logit (relative to its size), where
    rounding may keep other keys.
    """
    spec = spec or AttentionSpec()
    if block_table is not None:
        k, v = gather_pages(k, block_table), gather_pages(v, block_table)
    cache = kv_lens is not None or q_offset is not None
    if cu_seqlens_q is not None and any(s.block_q is not None for s in stats_module.map_stats(spec.stats)):
        raise ValueError("pooled maps are not defined for packed sequences")
    if cache:
        kv_lens = torch.as_tensor(k.shape[2] if kv_lens is None else kv_lens).expand(q.shape[0])
        offsets = kv_lens - q.shape[2] if q_offset is None else torch.as_tensor(q_offset).expand(q.shape[0])
        keep = _dropout_slices(dropout_keep, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        summed = _maps_summed(spec)
        pieces = [attention(q[b:b + 1], k[b:b + 1, :, :int(kv_lens[b])], v[b:b + 1, :, :int(kv_lens[b])],
                            _shifted(summed, b, offsets[b]), return_stats=True, dropout_p=dropout_p,
                            dropout_keep=keep(slice(b, b + 1), slice(None), slice(0, int(kv_lens[b]))),
                            margins=margins)
                  for b in range(q.shape[0])]
        return _joined([_maps_over_cache(spec, piece, q.shape[2], k.shape[2]) for piece in pieces], 0, 0,
                       return_stats)
    if cu_seqlens_q is not None:
        keep = _dropout_slices(dropout_keep, (1, q.shape[1], q.shape[0], k.shape[0]))
        pieces = []
        for i in range(cu_seqlens_q.numel() - 1):
            rows = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
            keys = slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
            dense = (t[part].transpose(0, 1).unsqueeze(0) for t, part in ((q, rows), (k, keys), (v, keys)))
            out, stats = attention(*dense, _shifted(spec, i, 0), return_stats=True, dropout_p=dropout_p,
                                   dropout_keep=keep(slice(None), rows, keys), margins=margins)
            first = stats_module.Stats(**{n: getattr(stats, n)[0] for n in stats.names()})
            pieces.append((out[0].transpose(0, 1), first))
        return _joined(pieces, 0, -1, return_stats)
    shape = check_inputs(q, k, v)
    if spec.differential is not None:
        p, lse, logits, keep = _differential_weights(q, k, spec), None, None, None
    else:
        s, keep = scores(q, k, spec)
        p, lse, logits = weights(s, keep, spec.normalization, spec.top_k)
    v = v.repeat_interleave(shape.q_heads // shape.kv_heads, dim=1)
    dropped = p if dropout_keep is None else p * dropout_keep.to(p.dtype) / (1.0 - dropout_p)
    out = dropped.to(v.dtype) @ v
    if not return_stats:
        return out
    return out, _row_stats(spec, p, lse, logits, keep, shape.kv_heads, margins)


def linear_attention(q, k, v, spec: LinearAttentionSpec, *, log_decay=None, state=None, return_state=False):
    """Linear attention of ``spec`` with the ``[Lq, Lk]`` weight matrix materialized:
    ``(phi(q) * scale) phi(k)^T``, if causal times ``exp(G_i - G_j)`` on and below the diagonal (0
    above), then (``normalize``) divided by its row sums plus ``eps``. Causal specs may continue from
    ``state`` (kv, n), which adds ``exp(G_i) (phi(q_i) * scale)`` times it, and with ``return_state``
    also return the state after the last token."""
    shape = check_inputs(q, k, v)
    group = shape.q_heads // shape.kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    phi_q, phi_k = spec.phi(q) * spec.scale_for(shape.qk_dim), spec.phi(k)
    w = phi_q @ phi_k.transpose(-1, -2)
    if not spec.causal:
        out = w @ v
        return out / (w.sum(-1, keepdim=True) + spec.eps) if spec.normalize else out
    if shape.q_len != shape.kv_len:
        raise ValueError(f"causal linear attention needs q and k of the same length, got {shape.q_len} and "
                         f"{shape.kv_len}")
    running = spec.log_decays(shape.batch, shape.q_heads, shape.q_len, q.device, log_decay, q.dtype).cumsum(-1)
    causal = torch.ones(shape.q_len, shape.q_len, dtype=torch.bool, device=q.device).tril()
    w = w * torch.exp(torch.where(causal, running[..., :, None] - running[..., None, :], -math.inf))
    kv0, n0 = state if state is not None else LinearState.zeros(*q.shape[:2], shape.qk_dim, shape.v_dim, q.device,
                                                                q.dtype)
    phi_q_past = phi_q * torch.exp(running)[..., None]  # sees the state, decayed from the first token
    out = w @ v + phi_q_past @ kv0.to(q.dtype)
    normalizer = w.sum(-1) + (phi_q_past * n0.to(q.dtype)[..., None, :]).sum(-1)
    if spec.normalize:
        out = out / (normalizer + spec.eps)[..., None]
    if not return_state:
        return out
    total = running[..., -1:] if shape.q_len else running.new_zeros(*running.shape[:2], 1)
    phi_k_to_end = phi_k * torch.exp(total - running)[..., None]
    kv = torch.exp(total)[..., None] * kv0.to(q.dtype) + phi_k_to_end.transpose(-1, -2) @ v
    n = torch.exp(total) * n0.to(q.dtype) + phi_k_to_end.sum(-2)
    return out, (kv, n)
