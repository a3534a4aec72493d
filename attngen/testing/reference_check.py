"""Compare a compiled spec with its materialized reference: forward, every statistic, every gradient."""

from __future__ import annotations

import dataclasses

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .. import reference
from ..blocks import as_block_mask, blocks_mask_mod
from ..runtime.compiled import compile as compile_spec
from ..linear import LinearAttentionSpec
from ..spec import AttentionSpec
from ..stats import Stats, forward_only
from .compare import FLOORS, Comparison, compare


class Float64(TorchFunctionMode):
    """Inside, every torch op computes in float64: floating tensors (a spec's captured float32
    tables, scalars it creates) are widened before each call, so the reference of a spec is exact
    without rebuilding it around float64 copies of its captures. Gradients still reach them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def widen(x):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64:
                return x.double()
            return x
        return func(*tree_map(widen, args), **tree_map(widen, kwargs or {}))


def learnable(spec: AttentionSpec | LinearAttentionSpec) -> dict[str, torch.Tensor]:
    """The tensors of ``spec`` that receive gradients: captured float tensors that require grad
    (``capture<i>``, in capture order; a captured view's base, once), the normalization's sink / alpha /
    beta tensors (entmax's alpha) and differential attention's ``lam``; a linear spec's ``decay``."""
    if isinstance(spec, LinearAttentionSpec):
        decay = spec.decay
        return {"decay": decay} if isinstance(decay, torch.Tensor) and decay.requires_grad else {}
    attn = compile_spec(spec)
    found, seen = {}, set()
    for i, capture in enumerate(attn.graph.captures):
        # a view (w[0] taken inside a mod, made anew each time the mod runs) is compared through its base
        tensor = capture.tensor._base if capture.tensor._is_view() else capture.tensor
        if capture.differentiable and id(tensor) not in seen:
            seen.add(id(tensor))
            found[f"capture{i}"] = tensor
    norm = spec.normalization
    named = [("sink", norm.sink)] + (list(zip(("alpha", "beta"), norm.affine)) if norm.affine else []) \
        + ([("alpha", norm.alpha)] if norm.family == "threshold" else []) + [("lam", spec.differential)]
    found.update({name: t for name, t in named if isinstance(t, torch.Tensor) and t.requires_grad})
    return found


def _with_blocks(spec: AttentionSpec, block_mask, q, k, call: dict) -> AttentionSpec:
    """``spec`` with a call's block mask folded into its mask_mod, for the reference (whose mods
    see absolute query positions when the call has a KV cache: the blocks are of the call's rows)."""
    if block_mask is None:
        return spec
    table = call.get("block_table")
    kv_len = k.shape[2] if table is None else table.shape[1] * k.shape[2]
    blocks = as_block_mask(block_mask, q.shape[2], kv_len, spec.mask_mod)
    dense = blocks.dense(q.shape[0], q.shape[1], q.shape[2], kv_len, q.device)
    in_kept_block = blocks_mask_mod(dense, blocks.block_size)
    if call.get("kv_lens") is not None or call.get("q_offset") is not None:
        lens = call.get("kv_lens")
        lens = torch.full((q.shape[0],), kv_len) if lens is None else lens
        offset = call.get("q_offset")
        offset = lens - q.shape[2] if offset is None else torch.as_tensor(offset).expand(q.shape[0])
        in_call_block = in_kept_block

        def in_kept_block(b, h, i, j):
            return in_call_block(b, h, i - offset[b], j)
    user = spec.mask_mod
    mask = in_kept_block if user is None else (lambda b, h, i, j: user(b, h, i, j) & in_kept_block(b, h, i, j))
    return dataclasses.replace(spec, mask_mod=mask)


def _forward_only_stats(spec: AttentionSpec) -> set[str]:
    return set(forward_only(spec.stats))


class AmbiguousTopK(ValueError):
    """The inputs put a top-k spec's cut-off within rounding of another key: float32 may keep other keys than
    the float64 reference, and the output jumps there, so no tolerance can compare them (draw other inputs)."""


def _margins(materialized, q, k, v) -> Stats:
    """The float64 reference's statistics with each row's max and top-k margins."""
    with Float64():
        _, stats = materialized(q.double(), k.double(), v.double(), return_stats=True, margins=True)
    return stats


def _check_top_k_cut_offs(spec: AttentionSpec, margins: Stats) -> None:
    """Raise :class:`AmbiguousTopK` where a row's k-th largest kept logit lies within float32's floor of the
    next (relative: the kernels compute the logits in float32 whatever q's dtype)."""
    cut = FLOORS[torch.float32]
    close = margins.top_k_margin.detach()[margins.top_k_margin <= cut]
    if close.numel():
        raise AmbiguousTopK(f"{close.numel()} rows keep their top {spec.top_k} logits by relative margins down to "
                            f"{float(close.min()):.2e}, within the {cut:g} that the kernels' float32 logits "
                            "may cross: "
                            "the kept keys are ambiguous (q and k on attngen.testing.Case's grid avoid this for "
                            "score_mods that keep products apart)")


def _near_ties(margins: Stats, dtype: torch.dtype, floor: float | None) -> torch.Tensor:
    """The rows whose two largest kept logits lie within the max statistic's floor of each other (``floor``
    times ``max(1, |max|)``, as :func:`~attngen.testing.compare.compare`'s), where float32 may put the arg-max,
    and so all of the max's gradient, on another key than float64 does."""
    floor = FLOORS.get(dtype, 1e-3) if floor is None else floor
    top = torch.where(torch.isfinite(margins.max), margins.max.abs().clamp(min=1.0), 1.0)
    return margins.max_margin <= floor * top


def _loss(out, stats, upstream: dict, names: list[str]) -> torch.Tensor:
    """sum(out * dout) + sum(stat * dstat) over the finite entries of each differentiable stat."""
    loss = (out.double() * upstream["out"]).sum()
    for name in names:
        value = getattr(stats, name).double()
        loss = loss + (torch.where(torch.isfinite(value), value, torch.zeros_like(value)) * upstream[name]).sum()
    return loss


def _run(attention, q, k, v, tensors, upstream, mode=None, backward=True,
         forward_only: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Every compared quantity of one implementation: out, stats, then (``backward``) gradients
    (of every statistic but those ``forward_only``)."""
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    if mode is None:
        out, stats = attention(*leaves, return_stats=True)
    else:
        with mode:
            out, stats = attention(*leaves, return_stats=True)
    values = {"out": out, **{name: getattr(stats, name) for name in stats.names()}}
    if not backward:
        return values
    names = [n for n in stats.names() if n not in forward_only]
    for name in ["out", *names]:  # upstream gradients are drawn (on CPU) the first time they are needed
        if name not in upstream:
            shape = out.shape if name == "out" else getattr(stats, name).shape
            drawn = torch.randn(shape, generator=upstream["_gen"], dtype=torch.float64).to(out.device)
            quiet = upstream["_quiet"].get(name)
            upstream[name] = drawn if quiet is None else torch.where(quiet, 0.0, drawn)
    inputs = [*leaves, *tensors.values()]
    grads = torch.autograd.grad(_loss(out, stats, upstream, names), inputs, allow_unused=True)
    for name, grad, leaf in zip(["dq", "dk", "dv", *(f"d {n}" for n in tensors)], grads, inputs):
        values[name] = torch.zeros_like(leaf) if grad is None else grad
    return values


def _comparisons(kernel, materialized, q, k, v, tensors, seed, floor, backward=True,
                 forward_only: set[str] = frozenset(), quiet: dict | None = None) -> list[Comparison]:
    """Run ``kernel`` and ``materialized`` (in float64, and at q's dtype for the baseline) with the same
    upstream gradients, and compare every quantity. ``quiet``: statistic name -> where its upstream
    gradient is 0."""
    upstream = {"_gen": torch.Generator().manual_seed(seed), "_quiet": quiet or {}}
    runs = [_run(kernel, q, k, v, tensors, upstream, None, backward, forward_only),
            _run(materialized, q.double(), k.double(), v.double(), tensors, upstream, Float64(), backward,
                 forward_only),
            _run(materialized, q, k, v, tensors, upstream, None, backward, forward_only)]
    ours, exact, plain = runs
    return [compare(name, ours[name], exact[name], plain[name], q.dtype, floor) for name in exact]


def _compare_linear(spec: LinearAttentionSpec, q, k, v, seed: int, floor: float | None,
                    log_decay=None, state=None) -> list[Comparison]:
    """The linear attention branch of :func:`compare_with_reference`; causal specs also compare the
    final state (values and, through it, gradients) and continue from ``state`` when given."""
    attn = compile_spec(spec)
    tensors = learnable(spec)
    if isinstance(log_decay, torch.Tensor) and log_decay.requires_grad:
        tensors["log_decay"] = log_decay
    if state is not None:
        tensors.update({f"state {name}": t for name, t in zip(("kv", "n"), state) if t.requires_grad})

    def kernel(*t, return_stats):
        if not spec.causal:
            return attn(*t), Stats()
        out, final = attn(*t, log_decay=log_decay, state=state, return_state=True)
        return out, Stats(state_kv=final.kv, state_n=final.n)

    def materialized(*t, return_stats):
        if not spec.causal:
            return reference.linear_attention(*t, spec), Stats()
        out, (kv, n) = reference.linear_attention(*t, spec, log_decay=log_decay, state=state, return_state=True)
        return out, Stats(state_kv=kv, state_n=n)
    return _comparisons(kernel, materialized, q, k, v, tensors, seed, floor)


def compare_with_reference(spec: AttentionSpec, q, k, v, *, block_mask=None, seed: int = 0,
                           floor: float | None = None, **call) -> list[Comparison]:
    """The compiled spec on ``q, k, v`` against its float64 reference: output, every statistic, and
    the gradients of q, k, v and of every learnable tensor (see :func:`learnable`), for a loss with
    random upstream gradients (``seed``). Each bound is FlashAttention's rule: twice the error of the
    reference computed in plain torch at q's dtype, plus ``floor`` (default by dtype, see
    ``compare.FLOORS``) times the quantity's size. ``block_mask`` and ``call`` (kv_lens, q_offset,
    cu_seqlens_q, cu_seqlens_k, block_table, mode, dropout_p) are passed to the call as they are; a
    paged cache (``block_table``) is compared forward only, as it has no backward. With dropout (the
    spec's or the call's), the call's dropout seed is ``seed`` and the reference applies the same
    mask. A :class:`~attngen.LinearAttentionSpec` takes its call's ``log_decay`` in
    ``call`` (compared as a learnable tensor when it requires grad) and may continue from a
    ``state`` (its tensors compared as learnable when they require grad); its final state is compared
    as a statistic (``state_kv``, ``state_n``)."""
    if isinstance(spec, LinearAttentionSpec):
        return _compare_linear(spec, q, k, v, seed, floor, **call)
    attn = compile_spec(spec)
    tensors = learnable(spec)
    packed = call.get("cu_seqlens_q") is not None
    ref_spec = spec if packed else _with_blocks(spec, block_mask, q, k, call)
    layout = {name: value for name, value in call.items() if name not in ("mode", "dropout_p")}  # how, not what
    rate = call.get("dropout_p", spec.dropout_p) or 0.0
    if rate:  # the call's dropout mask, drawn from the toolkit's seed, applied by the reference too
        call = {**call, "seed": seed}
        keep = attn.dropout_keep(*_kernel_shape(q, k, call), rate, seed, device=q.device)
        layout.update(dropout_p=rate, dropout_keep=keep)
    backward = call.get("block_table") is None

    def kernel(*t, **kw):
        return attn(*t, block_mask=block_mask, **call, **kw)

    def materialized(*t, **kw):
        return reference.attention(*t, ref_spec, **layout, **kw)
    forward_only_stats = _forward_only_stats(spec)
    # the max's gradient goes to one key; on a near-tie float32 may pick another one than the reference
    max_ties = backward and "max" in spec.stats and "max" not in forward_only_stats
    margins = _margins(materialized, q, k, v) if max_ties or spec.top_k is not None else None
    if spec.top_k is not None:
        _check_top_k_cut_offs(spec, margins)
    quiet = {"max": _near_ties(margins, q.dtype, floor)} if max_ties else {}
    return _comparisons(kernel, materialized, q, k, v, tensors, seed, floor, backward, forward_only_stats, quiet)


def _kernel_shape(q, k, call) -> tuple[int, int, int, int]:
    """[B, Hq, Lq, Lk] as a call's kernels see them: packed sequences are one batch entry of all
    tokens, a paged cache is as long as its block table's pages."""
    if call.get("cu_seqlens_q") is not None:
        return 1, q.shape[1], q.shape[0], k.shape[0]
    table = call.get("block_table")
    return q.shape[0], q.shape[1], q.shape[2], k.shape[2] * (1 if table is None else table.shape[1])


def assert_matches_reference(spec: AttentionSpec, q, k, v, **options) -> list[Comparison]:
    """:func:`compare_with_reference`, raising ``AssertionError`` that lists every quantity out of bounds."""
    results = compare_with_reference(spec, q, k, v, **options)
    failures = [str(r) for r in results if not r.ok]
    if failures:
        shape = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, {q.dtype}"
        raise AssertionError(f"kernel differs from the float64 reference ({shape}):\n  " + "\n  ".join(failures))
    return results
