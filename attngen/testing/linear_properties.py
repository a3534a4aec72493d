"""The properties ``attngen check`` runs on a :class:`~attngen.LinearAttentionSpec`.

The reference comparison (with data-dependent gates and a learnable initial
state where the spec takes them, and the final state compared too), then
invariants between independent ways of computing the same thing: the chunked
kernels against the recurrent step, one call against chained calls, grouped
heads against repeated ones, a batch against its entries.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..linear import LinearAttentionSpec, LinearState
from ..runtime.compiled import compile as compile_spec
from .cases import Case
from .compare import Comparison
from .invariants import REFERENCE, agreement
from .reference_check import compare_with_reference


def linear_case(spec: LinearAttentionSpec, case: Case) -> Case:
    """``case`` as a linear spec takes it: causal specs run over one sequence (Lk = Lq)."""
    return dataclasses.replace(case, kv_len=case.q_len) if spec.causal else case


def gates(case: Case, requires_grad: bool = False) -> torch.Tensor:
    """Per-token log decays [B, Hq, L] in (-inf, 0], as logsigmoid gates give them, drawn from the case's seed."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    logits = torch.randn(case.batch, case.q_heads, case.q_len, generator=gen) + 2.0
    return torch.nn.functional.logsigmoid(logits).requires_grad_(requires_grad)


def initial_state(case: Case, requires_grad: bool = False) -> LinearState:
    """A state as earlier tokens would leave it (n > 0, as positive features give), from the case's seed."""
    gen = torch.Generator().manual_seed(case.seed + 2)
    kv = torch.randn(case.batch, case.q_heads, case.qk_dim, case.v_dim, generator=gen)
    n = torch.rand(case.batch, case.q_heads, case.qk_dim, generator=gen) * case.qk_dim
    return LinearState(kv.requires_grad_(requires_grad), n.requires_grad_(requires_grad))


def _decay(spec: LinearAttentionSpec, case: Case, rows=slice(None)) -> dict:
    return {"log_decay": gates(case)[:, :, rows]} if spec.decay == "gated" else {}


def _outputs(out, state=None) -> dict[str, torch.Tensor]:
    return {"out": out} if state is None else {"out": out, "state kv": state.kv, "state n": state.n}


def matches_reference(spec: LinearAttentionSpec, case: Case) -> list[Comparison]:
    """Against the float64 reference: output, final state and every gradient (q, k, v, learnable
    decays, gates, the initial state)."""
    case = linear_case(spec, case)
    call = {"log_decay": gates(case, requires_grad=True)} if spec.decay == "gated" else {}
    if spec.causal:
        call["state"] = initial_state(case, requires_grad=True)
    return compare_with_reference(spec, *case.tensors(), seed=case.seed, **call)


def chained_calls(spec: LinearAttentionSpec, case: Case) -> list[Comparison]:
    """Splitting the sequence into two calls that pass the state on changes nothing."""
    case = linear_case(spec, case)
    if not spec.causal or case.q_len < 2:
        return []
    attn = compile_spec(spec)
    q, k, v = case.tensors(requires_grad=False)
    cut = 1 + case.seed % (case.q_len - 1)
    first, second = slice(0, cut), slice(cut, None)
    head, state = attn(q[:, :, first], k[:, :, first], v[:, :, first], return_state=True,
                       **_decay(spec, case, first))
    tail, state = attn(q[:, :, second], k[:, :, second], v[:, :, second], state=state, return_state=True,
                       **_decay(spec, case, second))
    whole = attn(q, k, v, return_state=True, **_decay(spec, case))
    return agreement(_outputs(torch.cat([head, tail], dim=2), state), _outputs(*whole), case.dtype)


def recurrent_step(spec: LinearAttentionSpec, case: Case) -> list[Comparison]:
    """The recurrent form (one token at a time from a given state) equals the chunked kernels."""
    case = linear_case(spec, case)
    if not spec.causal:
        return []
    attn = compile_spec(spec)
    q, k, v = case.tensors(requires_grad=False)
    state = initial_state(case)
    chunked = attn(q, k, v, state=state, return_state=True, **_decay(spec, case))
    stepped = attn.step(q, k, v, state, **_decay(spec, case))
    return agreement(_outputs(*stepped), _outputs(*chunked), case.dtype)


def gqa_is_repeated_heads(spec: LinearAttentionSpec, case: Case) -> list[Comparison]:
    """Grouped key/value heads equal each one repeated over its group of query heads."""
    case = linear_case(spec, case)
    if case.kv_heads == case.q_heads:
        return []
    attn = compile_spec(spec)
    group = case.q_heads // case.kv_heads
    q, k, v = case.tensors(requires_grad=False)
    grouped = attn(q, k, v, **_decay(spec, case))
    repeated = attn(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), **_decay(spec, case))
    return agreement(_outputs(grouped), _outputs(repeated), case.dtype)


def batch_split(spec: LinearAttentionSpec, case: Case) -> list[Comparison]:
    """Running each batch entry alone gives the same rows."""
    case = linear_case(spec, case)
    if case.batch < 2:
        return []
    attn = compile_spec(spec)
    q, k, v = case.tensors(requires_grad=False)
    decay = _decay(spec, case)
    parts = [attn(q[i:i + 1], k[i:i + 1], v[i:i + 1], **{n: t[i:i + 1] for n, t in decay.items()})
             for i in range(case.batch)]
    return agreement(_outputs(torch.cat(parts)), _outputs(attn(q, k, v, **decay)), case.dtype)


LINEAR_PROPERTIES: dict[str, Callable[[LinearAttentionSpec, Case], list[Comparison]]] = {
    REFERENCE: matches_reference,
    "chained calls": chained_calls,
    "recurrent step": recurrent_step,
    "GQA = repeated heads": gqa_is_repeated_heads,
    "batch split": batch_split,
}
