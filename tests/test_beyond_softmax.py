"""Attention beyond one softmax: differential attention (two score streams), against float64."""

from __future__ import annotations

import pytest
import torch

import attngen as ag
from attngen.testing import Case, assert_matches_reference

masks = ag.masks


def _lam(heads):
    return torch.linspace(0.2, 0.8, heads).requires_grad_()


DIFFERENTIAL = {
    "fixed_lambda": lambda h: ag.AttentionSpec(differential=0.5),
    "learnable_causal": lambda h: ag.AttentionSpec(differential=_lam(h), mask_mod=masks.causal),
    "two_score_mods": lambda h: (lambda slopes: ag.AttentionSpec(
        differential=_lam(h), mask_mod=masks.sliding_window(20),
        score_mod=lambda s, b, hh, q_idx, kv_idx: s - slopes[hh] * (q_idx - kv_idx) * 0.1,
        second_score_mod=lambda s, b, hh, q_idx, kv_idx: 2.0 * torch.tanh(s / 2.0)))(
            torch.rand(h, generator=torch.Generator().manual_seed(0)).requires_grad_()),
}


@pytest.mark.parametrize("case", [Case(2, 4, 2, 37, 45, 32, 16), Case(1, 4, 4, 1, 70, 16, 48),
                                  Case(1, 2, 1, 64, 33, 64, 64)], ids=lambda c: c.id)
@pytest.mark.parametrize("name", sorted(DIFFERENTIAL))
def test_differential_attention_matches_reference(name, case):
    assert_matches_reference(DIFFERENTIAL[name](case.q_heads), *case.tensors())


def test_differential_with_a_cache_packed_sequences_and_a_block_mask():
    spec = DIFFERENTIAL["learnable_causal"](2)
    q, k, v = Case(2, 2, 2, 3, 40, 16, 16).tensors()
    assert_matches_reference(spec, q, k, v, kv_lens=torch.tensor([40, 11]))
    blocks = torch.tensor([[[[True, False], [True, True]]]])
    q, k, v = Case(1, 2, 2, 40, 40, 16, 16).tensors()
    assert_matches_reference(spec, q, k, v, block_mask=ag.BlockMask(blocks, block_size=20))
    cu = torch.tensor([0, 13, 40])
    q, k, v = (torch.randn(40, 2, 16, requires_grad=True) for _ in range(3))
    assert_matches_reference(spec, q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_lambda_zero_is_softmax_over_the_first_halves():
    q, k, v = Case(1, 2, 2, 30, 30, 32, 16).tensors(requires_grad=False)
    out = ag.compile(ag.AttentionSpec(differential=0.0, mask_mod=masks.causal))(q, k, v)
    first = ag.compile(ag.AttentionSpec(mask_mod=masks.causal, scale=16 ** -0.5))(q[..., :16], k[..., :16], v)
    torch.testing.assert_close(out, first, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: ag.AttentionSpec(differential=0.5, normalization=ag.norms.OffByOne()), "without sink"),
    (lambda: ag.AttentionSpec(differential=0.5, stats=("lse",)), "no statistics yet"),
    (lambda: ag.AttentionSpec(second_score_mod=lambda s, b, h, q, k: s), "set differential=lam"),
    (lambda: ag.AttentionSpec(differential="big"), "finite float or a per-head float tensor"),
    (lambda: ag.AttentionSpec(differential=0.5, dropout_p=0.1), "dropout"),
])
def test_bad_differential_specs(make, message):
    with pytest.raises(ag.SpecError, match=message):
        make()


def test_odd_head_dims_are_refused():
    q, k, v = Case(1, 2, 2, 8, 8, 15, 16).tensors()
    with pytest.raises(ValueError, match="head dim must be even, got 15"):
        ag.compile(ag.AttentionSpec(differential=0.5))(q, k, v)


# -- stick-breaking -------------------------------------------------------------------------

STICK = {
    "causal": lambda h: ag.AttentionSpec(normalization=ag.norms.StickBreaking(), mask_mod=masks.causal),
    "window_with_bias": lambda h: (lambda bias: ag.AttentionSpec(
        normalization=ag.norms.StickBreaking(), mask_mod=masks.causal & masks.sliding_window(20),
        score_mod=lambda s, b, hh, q_idx, kv_idx: s + bias[hh, kv_idx % 16]))(
            torch.randn(h, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()),
    "every_key": lambda h: ag.AttentionSpec(normalization=ag.norms.StickBreaking()),
}


@pytest.mark.parametrize("case", [Case(2, 4, 2, 37, 45, 16, 8), Case(1, 2, 2, 70, 70, 32, 32),
                                  Case(1, 2, 1, 1, 33, 16, 16)], ids=lambda c: c.id)
@pytest.mark.parametrize("name", sorted(STICK))
def test_stick_breaking_matches_reference(name, case):
    assert_matches_reference(STICK[name](case.q_heads), *case.tensors())


@pytest.mark.parametrize("case", [Case(2, 4, 2, 2, 32, 8, 8), Case(1, 2, 1, 3, 200, 8, 8)], ids=lambda c: c.id)
def test_stick_breaking_gradients_stay_exact_when_the_stick_runs_out(case):
    """Large logits over many keys: the row's total log-stick reaches hundreds, yet each key's share
    must be as exact as a direct sum (found by the fuzzer: total minus prefix lost 1e-5 relative)."""
    spec = ag.AttentionSpec(normalization=ag.norms.StickBreaking(), scale=1.0,
                            score_mod=lambda s, b, h, q_idx, kv_idx: s + s)
    assert_matches_reference(spec, *case.tensors())


def test_stick_breaking_with_dropout_a_cache_and_packed_sequences():
    spec = STICK["causal"](2)
    q, k, v = Case(2, 2, 2, 20, 30, 16, 16).tensors()
    assert_matches_reference(spec, q, k, v, dropout_p=0.25)
    q, k, v = Case(2, 2, 2, 2, 40, 16, 16).tensors()
    assert_matches_reference(spec, q, k, v, kv_lens=torch.tensor([40, 9]))
    cu = torch.tensor([0, 17, 40])
    q, k, v = (torch.randn(40, 2, 16, requires_grad=True) for _ in range(3))
    assert_matches_reference(spec, q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_the_nearest_key_takes_its_share_first():
    """With equal logits z, key i-d (d keys back) gets sigmoid(z) (1 - sigmoid(z))^d; the weights
    sum to 1 - (1 - sigmoid(z))^(i+1) < 1."""
    q, k = torch.zeros(1, 1, 6, 16), torch.zeros(1, 1, 6, 16)  # every logit 0: sigmoid = 1/2
    weights = ag.compile(STICK["causal"](1))(q, k, torch.eye(6).expand(1, 1, 6, 6).contiguous()[..., :6])
    for i in range(6):
        for j in range(i + 1):
            assert weights[0, 0, i, j].item() == pytest.approx(0.5 * 0.5 ** (i - j))
        assert weights[0, 0, i].sum().item() == pytest.approx(1 - 0.5 ** (i + 1))


def test_sparsemax_rows_on_a_single_key_have_exactly_zero_score_gradients():
    """Found by the deep fuzzer (seed 7): with one key per row, w (dP - delta) is the difference of two
    roundings of dP, which summed over 68 rows exceeded the fp32 bound on a dK that is exactly 0."""
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + s, normalization=ag.norms.Sparsemax(),
                            scale=1.0)
    q, k, v = Case(batch=2, q_heads=4, kv_heads=1, q_len=17, kv_len=1, qk_dim=32, v_dim=32, seed=128).tensors()
    assert_matches_reference(spec, q, k, v, seed=128)
    ag.compile(spec)(q, k, v).square().sum().backward()
    assert torch.all(k.grad == 0) and torch.all(q.grad == 0) and v.grad.abs().sum() > 0
