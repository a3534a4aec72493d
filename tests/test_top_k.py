"""Top-k attention (``AttentionSpec(top_k=...)``): each row's k largest logits alone, against float64.

q and k are multiples of 1/4 and 3/16 in [-2, 2] (``Case(grid=True)``) and the scale a power of two, so that every
score is exact in float32 as in float64: the kernels and the reference then keep the same keys, ties included
(two keys whose float32 scores round apart, or together, would make either side's choice a matter of rounding).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attngen as ag
from attngen import norms
from attngen.errors import SpecError
from attngen.testing import Case, assert_matches_reference, check_spec
from attngen.runtime.loader import load_kernels
from attngen.testing.cases import packed_call, paged_call

SCALE = 0.25


SPECS = {
    "plain_k1": lambda c: ag.AttentionSpec(scale=SCALE, top_k=1),
    "causal_stats_k5": lambda c: ag.AttentionSpec(scale=SCALE, mask_mod=ag.masks.causal, top_k=5,
                                                  stats=("lse", "max", "entropy")),
    "alibi_learnable_k7": lambda c: ag.AttentionSpec(
        scale=SCALE, mask_mod=ag.masks.causal, top_k=7,
        score_mod=lambda s, b, h, q_idx, kv_idx: s - c["slopes"][h] * (q_idx - kv_idx)),
    "learnable_sink_k4": lambda c: ag.AttentionSpec(scale=SCALE, top_k=4, normalization=norms.Softmax(sink=c["sink"])),
    "scalable_unmasked_k6": lambda c: ag.AttentionSpec(scale=SCALE, top_k=6, mask_mod=ag.masks.sliding_window(20),
                                                       normalization=norms.ScalableSoftmax(s=0.5, count="unmasked")),
    "key_bias_learnable_k3": lambda c: ag.AttentionSpec(
        scale=SCALE, top_k=3, score_mod=lambda s, b, h, q_idx, kv_idx: s + c["bias"][h, kv_idx]),
    "fully_masked_rows_k2": lambda c: ag.AttentionSpec(scale=SCALE, top_k=2,
                                                       mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 3),
    "score_mod_inf_k3": lambda c: ag.AttentionSpec(
        scale=SCALE, top_k=3, score_mod=lambda s, b, h, q_idx, kv_idx: torch.where((q_idx + kv_idx) % 5 == 0,
                                                                                    float("-inf"), s)),
    "expectation_col_sum_k5": lambda c: ag.AttentionSpec(
        scale=SCALE, top_k=5, mask_mod=ag.masks.causal,
        stats=(ag.stats.expectation(lambda s, b, h, q_idx, kv_idx: s * s, "second_moment"), "col_sum")),
    "more_than_keys_k500": lambda c: ag.AttentionSpec(scale=SCALE, top_k=500, mask_mod=ag.masks.causal),
    # beyond the softmax: each normalization of logits over the kept keys alone
    "sparsemax_support_k4": lambda c: ag.AttentionSpec(  # halved scores widen the support: top_k cuts more rows
        scale=SCALE, top_k=4, mask_mod=ag.masks.causal, normalization=norms.Sparsemax(),
        score_mod=lambda s, b, h, q_idx, kv_idx: 0.5 * s, stats=("support", "entropy")),
    "entmax_learnable_k4": lambda c: ag.AttentionSpec(scale=SCALE, top_k=4, normalization=norms.Entmax(c["alpha"]),
                                                      stats=("max", "col_sum")),
    "softpick_inf_k5": lambda c: ag.AttentionSpec(
        scale=SCALE, top_k=5, normalization=norms.Softpick(),
        score_mod=lambda s, b, h, q_idx, kv_idx: torch.where((q_idx + kv_idx) % 7 == 0, float("-inf"), s)),
    "signed_k3": lambda c: ag.AttentionSpec(scale=SCALE, top_k=3, normalization=norms.SignedSoftmax(),
                                            mask_mod=ag.masks.causal),
    "stick_breaking_k5": lambda c: ag.AttentionSpec(scale=SCALE, top_k=5, normalization=norms.StickBreaking(),
                                                    mask_mod=ag.masks.causal, stats=("max", "col_sum")),
}


def _captures(case: Case) -> dict:
    gen = torch.Generator().manual_seed(case.seed + 1)
    return {"slopes": (0.25 * torch.arange(1, case.q_heads + 1, dtype=torch.float32)).requires_grad_(),
            "sink": torch.randn(case.q_heads, generator=gen).requires_grad_(),
            "bias": (torch.randint(-4, 5, (case.q_heads, case.kv_len), generator=gen) / 4).requires_grad_(),
            "alpha": (1.25 + 0.25 * torch.arange(case.q_heads, dtype=torch.float32)).requires_grad_()}


CASES = [Case(2, 2, 1, 37, 53, 16, 8, seed=1, grid=True),
         Case(1, 2, 2, 64, 64, 32, 16, torch.bfloat16, seed=2, grid=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_top_k_matches_reference(name, case):
    assert_matches_reference(SPECS[name](_captures(case)), *case.tensors(), seed=case.seed)


def _weights(spec, case: Case):
    """The kernels' weights [B, Hq, Lq, Lk]: the output for v the identity on the keys."""
    q, k, _ = case.tensors(requires_grad=False)
    eye = torch.eye(case.kv_len).expand(case.batch, case.kv_heads, -1, -1)
    return ag.compile(spec)(q.detach(), k.detach(), eye)


def test_exactly_k_keys_weigh_where_scores_differ():
    """Normal q and k (no two scores of a row equal): every row with more than k keys has k weights."""
    case = Case(1, 2, 2, 40, 48, 16, 48, seed=3)
    spec = ag.AttentionSpec(top_k=6, mask_mod=ag.masks.causal)
    weights = _weights(spec, case)
    counts = (weights > 0).sum(-1)
    available = torch.arange(case.q_len).add(1).clamp(max=case.kv_len)  # causal: query i sees keys 0..i
    assert torch.equal(counts, available.clamp(max=6).expand_as(counts))
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(counts, dtype=weights.dtype))


def test_keys_tied_at_the_kth_largest_all_weigh():
    """Five keys share the row's largest score: top_k=2 keeps all five, equally."""
    q = torch.ones(1, 1, 3, 4)
    k = torch.zeros(1, 1, 9, 4)
    k[..., [1, 3, 4, 6, 8], :] = 1.0
    spec = ag.AttentionSpec(top_k=2)
    weights = ag.compile(spec)(q, k, torch.eye(9).view(1, 1, 9, 9))
    expected = torch.zeros(9)
    expected[[1, 3, 4, 6, 8]] = 0.2
    torch.testing.assert_close(weights, expected.expand(1, 1, 3, 9))


# the normalizations of logits top_k applies to (softpick's eps as the fuzzer's: grid scores can be 0 exactly,
# where the paper's 1e-8 alone keeps a row's normalizer |e^0 - 1| from 0 and its gradients are 1e8)
NORMALIZATIONS = {"softmax": norms.Softmax, "sparsemax": norms.Sparsemax, "entmax": lambda: norms.Entmax(1.5),
                  "softpick": lambda: norms.Softpick(eps=1e-2), "signed": norms.SignedSoftmax,
                  "stick_breaking": norms.StickBreaking}


@given(top_k=st.integers(1, 12), q_len=st.integers(1, 40), kv_len=st.integers(1, 48),
       mask=st.sampled_from(["none", "causal", "window"]), alibi=st.booleans(), seed=st.integers(0, 1000),
       normalization=st.sampled_from(sorted(NORMALIZATIONS)))
def test_any_shape_mask_k_and_normalization(top_k, q_len, kv_len, mask, alibi, seed, normalization):
    case = Case(1, 2, 1, q_len, kv_len, 8, 8, seed=seed, grid=True)
    masks = {"none": None, "causal": ag.masks.causal, "window": ag.masks.sliding_window(6, 3)}
    score_mod = (lambda s, b, h, q_idx, kv_idx: s - 0.5 * (h + 1) * (q_idx - kv_idx).abs()) if alibi else None
    spec = ag.AttentionSpec(scale=SCALE, top_k=top_k, mask_mod=masks[mask], score_mod=score_mod,
                            normalization=NORMALIZATIONS[normalization](), stats=("max",))
    assert_matches_reference(spec, *case.tensors(), seed=seed)


CALL_CASE = Case(2, 4, 2, 5, 70, 16, 16, seed=4, grid=True)
CALLS = {
    "decode": lambda q, k, v: ((q, k, v), dict(mode="decode")),
    "kv_cache": lambda q, k, v: ((q, k, v), dict(kv_lens=torch.tensor([70, 33], dtype=torch.int32))),
    "block_mask": lambda q, k, v: ((q, k, v), dict(block_mask=torch.rand(1, 1, 1, 5, generator=torch.Generator()
                                                                          .manual_seed(0)) < 0.6)),
    "dropout": lambda q, k, v: ((q, k, v), dict(dropout_p=0.25)),
    "packed": lambda q, k, v: packed_call(q, k, v, [5, 3], [70, 41]),
    "paged_decode": lambda q, k, v: paged_call(q, k, v, [70, 52], 16, seed=4, mode="decode"),
}


@pytest.mark.parametrize("normalization", ["softmax", "entmax", "stick_breaking"])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_top_k_in_every_kind_of_call(call, normalization):
    spec = ag.AttentionSpec(scale=SCALE, top_k=9, stats=("max",) + (("lse",) if normalization == "softmax" else ()),
                            normalization=NORMALIZATIONS[normalization](),
                            score_mod=lambda s, b, h, q_idx, kv_idx: s - 0.125 * (h + 1) * (q_idx - kv_idx).abs())
    inputs, options = CALLS[call](*CALL_CASE.tensors())
    assert_matches_reference(spec, *inputs, seed=CALL_CASE.seed, **options)


@pytest.mark.parametrize("options, message", [
    (dict(top_k=0), "top_k must be a positive int"),
    (dict(top_k=2.0), "top_k must be a positive int"),
    (dict(top_k=True), "top_k must be a positive int"),
    (dict(top_k=4, normalization=norms.Sigmoid()), "its normalization must take logits"),
    (dict(top_k=4, normalization=norms.Normalized(torch.sigmoid)), "its normalization must take logits"),
    (dict(top_k=4, normalization=norms.AffineSoftmax(alpha=2.0)), "without affine output"),
    (dict(top_k=4, differential=0.5), "with differential"),
])
def test_bad_top_k_is_refused(options, message):
    with pytest.raises(SpecError, match=message):
        ag.AttentionSpec(**options)


def test_top_k_inside_torch_compile():
    """The cut-offs' placeholder and the residual travel through the custom op: fullgraph, same gradients."""
    case = Case(1, 2, 2, 24, 24, 16, 16, seed=5, grid=True)
    spec = ag.AttentionSpec(scale=SCALE, top_k=4, mask_mod=ag.masks.causal, stats=("lse",))
    attn = ag.compile(spec)

    def loss(q, k, v):
        out, stats = attn(q, k, v, return_stats=True)
        return out.square().sum() + stats.lse.sum()

    results = []
    for run in (loss, torch.compile(loss, fullgraph=True)):
        q, k, v = case.tensors()
        run(q, k, v).backward()
        results.append((q.grad, k.grad, v.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_the_grid_makes_scores_exact_and_property_checks_use_it():
    q, k, _ = Case(1, 1, 1, 9, 11, 64, 8, grid=True).tensors(requires_grad=False)
    assert torch.equal(q @ k.transpose(-1, -2), (q.double() @ k.double().transpose(-1, -2)).float())
    spec = ag.AttentionSpec(top_k=3, mask_mod=ag.masks.causal)
    reports = check_spec(spec, examples=2, heads=2, batch=1, max_len=20)
    assert all(r.ok for r in reports), [(r.name, r.failure, r.error) for r in reports if not r.ok]
    assert all(r.worst_case is None or r.worst_case.grid for r in reports)


def test_the_grid_keeps_sparsemax_thresholds_off_the_scores():
    """Sparsemax's threshold is a row's sum of its support's logits less 1, over their count: with q and k both
    on the grid of 1/4 and a power-of-two scale it fell exactly on a logit in a third of these cases (the
    gradient jumps there, and the kernels and the reference took different sides: dq off by 1.0)."""
    spec = ag.AttentionSpec(top_k=3, mask_mod=ag.masks.causal, normalization=norms.Sparsemax(), stats=("support",))
    for seed in (1, 11):
        assert_matches_reference(spec, *Case(1, 2, 1, 29, 41, 64, 8, seed=seed, grid=True).tensors(), seed=seed)


def test_an_exported_top_k_module_fills_in_the_placeholder_of_its_cut_offs(tmp_path):
    slopes = torch.tensor([0.25, 0.5])
    spec = ag.AttentionSpec(scale=SCALE, top_k=3, mask_mod=ag.masks.causal,
                            score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx))
    attn = ag.compile(spec)
    module = load_kernels(attn.export(tmp_path / "top_k.py"), interpret=True)
    q, k, v = Case(1, 2, 2, 17, 17, 16, 16, grid=True).tensors(requires_grad=False)
    assert module.CALL_CAPTURES == {"topk_floor": 1}
    out, lse = module.forward(q, k, v, slopes)
    torch.testing.assert_close(out, attn(q, k, v))
