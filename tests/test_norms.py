"""Every normalization x mask x odd shapes, forward and backward, against float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attngen as ag
from attngen import norms
from attngen.testing import Case, assert_matches_reference
from attngen.testing.dispatches import dispatched
from checks import apply_kernel_helper, check_variant, check_wide_scores, variant_inputs
from variants import VARIANTS, Case, Variant, case_id


def _learnable(name):
    return lambda case, gen: {name: (0.5 + torch.rand(case.q_heads, generator=gen)).requires_grad_()}


def _affine(case, gen):
    return {"alpha": (0.5 + torch.rand(case.q_heads, generator=gen)).requires_grad_(),
            "beta": (0.1 * torch.rand(case.q_heads, generator=gen)).requires_grad_()}


def _none(case, gen):
    return {}


NORMS = {
    "softmax": (_none, lambda c: norms.Softmax()),
    "off_by_one": (_none, lambda c: norms.OffByOne()),
    "learnable_sink": (_learnable("sink"), lambda c: norms.Softmax(sink=c["sink"])),
    "sigmoid_-log_n": (_none, lambda c: norms.Sigmoid(bias="-log n")),
    "sigmoid_learnable_bias": (_learnable("bias"), lambda c: norms.Sigmoid(bias=c["bias"])),
    "relu2_length": (_none, lambda c: norms.ReLU(power=2)),
    "relu_unmasked": (_none, lambda c: norms.ReLU(power=1, normalize="unmasked")),
    "scalable_learnable": (_learnable("s"), lambda c: norms.ScalableSoftmax(s=c["s"])),
    "scalable_unmasked": (_none, lambda c: norms.ScalableSoftmax(s=0.7, count="unmasked")),
    "affine_learnable": (_affine, lambda c: norms.AffineSoftmax(alpha=c["alpha"], beta=c["beta"])),
    "elementwise_sigmoid_squared": (_none, lambda c: norms.Elementwise(lambda s: torch.sigmoid(s) ** 2)),
    "sparsemax": (_none, lambda c: norms.Sparsemax()),
    "entmax15": (_none, lambda c: norms.Entmax(1.5)),
    "entmax_1_3": (_none, lambda c: norms.Entmax(1.3)),
    "entmax_1_25": (_none, lambda c: norms.Entmax(1.25)),  # weights u ** 4 by squarings, not exp2 of log2
    # adaptively sparse attention: alpha per head in (1.15, 2], learnable
    "entmax_learnable": (lambda case, gen: {"alpha": (2.0 - 0.85 * torch.rand(case.q_heads, generator=gen)).requires_grad_()},
                         lambda c: norms.Entmax(c["alpha"])),
    # eps 1e-2: with the default 1e-8 a row whose normalizer is small (one key scoring 0.01) amplifies
    # float32 rounding by 1 / normalizer in the backward (README, softpick); the default runs elsewhere
    "softpick": (_none, lambda c: norms.Softpick(eps=1e-2)),
    "signed_softmax": (_none, lambda c: norms.SignedSoftmax()),
    # kernels whose fn' / fn is bounded: where it is not (s ** 2 near 0), the FlashAttention-style
    # delta's absolute rounding, times fn' / norm, can exceed float32's bounds on a row of one
    # dominant key (README, Normalized)
    "normalized_relu2": (_none, lambda c: norms.Normalized(lambda s: torch.clamp(s, min=0.0) ** 2 + 0.1)),
    "normalized_sigmoid": (_none, lambda c: norms.Normalized(torch.sigmoid, eps=1e-3)),
}
MASKS = {
    "no_mask": None,
    "causal": ag.masks.causal,
    "sliding_window": ag.masks.sliding_window(5),
    "empty_rows": lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 3,
}
CASES = [Case(1, 2, 2, 37, 37, 16, 16), Case(1, 4, 2, 50, 29, 32, 16), Case(2, 2, 1, 17, 45, 16, 32)]


def _variant(norm_name, mask_name):
    captures, make_norm = NORMS[norm_name]
    mask = MASKS[mask_name]
    return Variant(f"{norm_name}-{mask_name}", captures,
                   lambda c: ag.AttentionSpec(mask_mod=mask, normalization=make_norm(c),
                                              score_mod=lambda s, b, h, q_idx, kv_idx: s * 1.5))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("norm_name", NORMS)
def test_normalization_matches_reference(norm_name, mask_name, case):
    check_variant(_variant(norm_name, mask_name), case)


@pytest.mark.parametrize("scale", [-0.8, 0.0])
@pytest.mark.parametrize("norm_name", [*NORMS, "stick_breaking"])
def test_scale_of_either_sign(norm_name, scale):
    """A scale of 0 or below, as FlexAttention and SDPA take it: softmax's row max, which the kernels take
    over the unscaled products for a positive scale, is then the scaled scores' own."""
    captures, make_norm = NORMS.get(norm_name, (_none, lambda c: norms.StickBreaking()))
    variant = Variant(f"{norm_name}-scale", captures, lambda c: ag.AttentionSpec(
        mask_mod=MASKS["empty_rows"], normalization=make_norm(c), scale=scale))
    check_variant(variant, CASES[1])


@pytest.mark.parametrize("case", CASES[1:], ids=case_id)
@pytest.mark.parametrize("norm_name, mode", [("sparsemax", "auto"), ("entmax_1_3", "auto"), ("entmax_learnable", "auto"),
                                             ("softpick", "auto"), ("softpick", "decode"),
                                             ("signed_softmax", "auto"), ("signed_softmax", "decode"),
                                             ("stick_breaking", "auto"), ("stick_breaking", "decode"),
                                             ("sigmoid_learnable_bias", "auto"), ("sigmoid_learnable_bias", "decode"),
                                             ("relu2_length", "auto"), ("elementwise_sigmoid_squared", "decode"),
                                             ("normalized_sigmoid", "auto"), ("normalized_sigmoid", "decode")])
def test_max_statistic_beyond_softmax(norm_name, mode, case):
    """The "max" statistic (each row's largest logit, its gradient to the first key holding it) of every
    family: the threshold family's extent pass finds it, softpick's, Cog's and stick-breaking's forward
    loop as the softmax's (decode: over split-KV partials); entmax's d alpha takes no part of it. The
    elementwise and normalized families take score_mod's result (their score_fn is its weight), its gradient
    that result's derivatives. Rows with no key (empty_rows) give -inf and no gradient."""
    variant = _variant(norm_name, "empty_rows") if norm_name in NORMS else \
        Variant(norm_name, _none, lambda c: ag.AttentionSpec(normalization=norms.StickBreaking(),
                                                             mask_mod=MASKS["empty_rows"]))
    q, k, v, spec = variant_inputs(variant, case)
    assert_matches_reference(dataclasses.replace(spec, stats=("max",)), q, k, v, seed=case.seed, mode=mode)


@pytest.mark.parametrize("norm_name", ["learnable_sink", "sigmoid_-log_n", "relu_unmasked", "affine_learnable",
                                       "sparsemax", "entmax_learnable", "softpick", "signed_softmax",
                                       "normalized_sigmoid"])
def test_every_family_at_mla_head_dims(norm_name):
    """Head dims above 256 (MLA's absorbed Dqk 576, Dv 512, one kv head) through each family's kernels."""
    check_variant(_variant(norm_name, "causal"), Case(1, 4, 1, 21, 26, 576, 512))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm_name", NORMS)
def test_normalization_in_half_precision(norm_name, dtype):
    """Found by fuzzing in bfloat16: affine softmax lost its beta term on CPU (a bool tile cast to
    bfloat16 in Triton's interpreter)."""
    check_variant(_variant(norm_name, "causal"), Case(1, 4, 2, 33, 41, 16, 16, dtype=dtype))


def test_dropout_in_bfloat16_over_a_single_key():
    """Found by `attngen fuzz --half`: over one key dQ and dK are 0. The kept weights' 1 / (1 - p),
    rounded to bf16 in the P V product while dP took it in float32, left dK 12x its bound (0.049 at
    128 queries); the weights now go in masked and the product is scaled in float32."""
    alpha = (0.5 + 0.5 * torch.rand(4, generator=torch.Generator().manual_seed(5))).requires_grad_()
    spec = ag.AttentionSpec(normalization=norms.AffineSoftmax(alpha=alpha, beta=0.05), stats=())
    q, k, v = Case(2, 4, 1, 128, 1, 8, 8, dtype=torch.bfloat16, seed=37957).tensors()
    check = {r.name: r for r in assert_matches_reference(spec, q, k, v, seed=37957, dropout_p=0.1)}
    assert check["dk"].error < 1e-4 and check["dq"].error < 1e-4


@pytest.mark.parametrize("kv_len", [64, 77, 20], ids=["whole_tiles", "ragged", "one_short_tile"])
def test_affine_softmax_value_sums_read_v_in_place(kv_len):
    """Tiles affine softmax keeps whole add their values' column sums, which the launcher takes per
    tile: a last, shorter tile is summed on its own rather than v padded (a copy of v per call)."""
    spec = ag.AttentionSpec(normalization=norms.AffineSoftmax(alpha=0.9, beta=0.02))
    q, k, v = Case(1, 2, 2, 40, kv_len, 16, 16, seed=3).tensors(requires_grad=False)
    attn = ag.compile(spec)
    ops = dispatched(lambda: attn(q, k, v))
    assert "constant_pad_nd" not in ops and ops["sum"] >= 1, ops
    assert_matches_reference(spec, q, k, v)


def test_float32_softmax_output_is_kept_only_where_a_tensor_learns():
    """The float32 output residual for the backward's delta (o_soft) costs a float32 write of the whole
    output. A fixed sink, a float or a tensor without requires_grad, does without; a learnable one
    keeps it, also when requires_grad is switched on after compiling (the kernels are rebuilt)."""
    assert "OSOFT" not in ag.compile(ag.AttentionSpec(normalization=norms.OffByOne())).source
    sink = torch.tensor([0.5, -1.0])
    attn = ag.compile(ag.AttentionSpec(normalization=norms.Softmax(sink=sink)))
    assert "OSOFT" not in attn.source
    sink.requires_grad_()
    q, k, v = (t.requires_grad_() for t in Case(1, 2, 2, 20, 20, 16, 16).tensors())
    attn(q, k, v).sum().backward()
    assert "OSOFT" in attn.source and sink.grad is not None and torch.isfinite(sink.grad).all()


def test_sigmoid_and_tanh_keep_float32_accuracy_over_wide_scores():
    """The kernels' sigmoid and tanh take one exp2 and a reciprocal in multiply-adds (no division); they
    stay within float32's bounds (with one Newton step fewer, the output is 7x out and dK 48x)."""
    check_wide_scores()


@pytest.mark.parametrize("norm_name", NORMS)
def test_fully_masked_rows_give_zero_output_without_nan(norm_name):
    variant = _variant(norm_name, "empty_rows")
    case = Case(1, 2, 2, 20, 20, 16, 16)
    check_variant(variant, case)
    q, k, v, spec = variant_inputs(variant, case)
    out = ag.compile(spec)(q, k, v)
    assert torch.all(out[:, :, :3] == 0) and torch.isfinite(out).all()


@pytest.mark.parametrize("count", ["length", "unmasked"])
def test_scalable_softmax_of_one_key_keeps_a_dropped_key_dropped(count):
    """With one key (or one kept), log(n) = 0 made a score_mod's -inf 0 * inf = NaN: the output, lse and max of
    rows with their key dropped (found by attngen fuzz, seed 1041: the kernel's max -inf, the reference's NaN).
    log(n) is floored at 2^-126: those rows are empty (out 0, lse and max -inf), the others' logits within
    1e-37 of 0."""
    spec = ag.AttentionSpec(normalization=norms.ScalableSoftmax(s=torch.tensor([0.5, 0.8], requires_grad=True),
                                                               count=count),
                            score_mod=lambda s, b, h, q_idx, kv_idx: torch.where(q_idx % 2 == 0, float("-inf"), s),
                            mask_mod=(lambda b, h, q_idx, kv_idx: kv_idx == 2) if count == "unmasked" else None,
                            stats=("lse", "max", "entropy"))
    q, k, v = Case(1, 2, 2, 6, 1 if count == "length" else 5, 8, 8).tensors()
    out, stats = ag.compile(spec)(q, k, v, return_stats=True)
    assert torch.all(out[:, :, 0::2] == 0) and torch.isfinite(out).all()
    assert torch.all(stats.lse[:, :, 0::2] == float("-inf")) and torch.all(stats.max[:, :, 0::2] == float("-inf"))
    assert torch.allclose(stats.lse[:, :, 1::2], torch.zeros(1, 2, 3), atol=1e-30)
    assert_matches_reference(spec, q, k, v)


def test_sink_enters_lse_and_fully_masked_rows_have_lse_equal_to_the_sink():
    sink = torch.tensor([0.5, -1.0])
    spec = ag.AttentionSpec(mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 3,
                            normalization=norms.Softmax(sink=sink))
    q, k, v = Case(1, 2, 2, 10, 10, 16, 16, seed=0).tensors()
    out, stats = ag.compile(spec)(q, k, v, return_stats=True)
    torch.testing.assert_close(stats.lse[0, :, :3], sink[:, None].expand(2, 3))


def test_off_by_one_weights_sum_to_less_than_one():
    q, k, v = Case(1, 1, 1, 16, 16, 16, 16, seed=1).tensors()
    ones = torch.ones_like(v)
    plain = ag.compile(ag.AttentionSpec())(q, k, ones)
    off_by_one = ag.compile(ag.AttentionSpec(normalization=norms.OffByOne()))(q, k, ones)
    torch.testing.assert_close(plain, torch.ones_like(plain))
    assert torch.all(off_by_one < 1) and torch.all(off_by_one > 0)


def test_elementwise_normalizations_reject_lse():
    with pytest.raises(ag.SpecError, match=r"stats \['lse'\] are not defined for Sigmoid"):
        ag.AttentionSpec(normalization=norms.Sigmoid(), stats=("lse",))
    assert ag.AttentionSpec(normalization=norms.Sigmoid()).stats == ()


@pytest.mark.parametrize("kv_len", [1, 5])
def test_softpick_has_no_gradient_at_a_logit_of_zero(kv_len):
    """relu(exp(l) - 1) and |exp(l) - 1| have a kink at l = 0: there the kernels (and the reference, as torch's
    relu and abs) take no gradient. Key 0 scores exactly 0 for every query (q and k orthogonal); alone, its
    row's normalizer is eps, and a gradient through the kink would be 1 / eps (torch.clamp passes it)."""
    q, k, v = Case(1, 1, 1, 6, kv_len, 8, 8, seed=3, grid=True).tensors(requires_grad=False)
    q[..., 0], k[..., 0, :] = 0.0, 0.0
    k[..., 0, 0] = 1.0
    spec = ag.AttentionSpec(normalization=norms.Softpick(eps=1e-2), score_mod=lambda s, b, h, q_idx, kv_idx: 2 * s)
    assert_matches_reference(spec, *(t.requires_grad_() for t in (q, k, v)))


def test_softpick_weighs_keys_scoring_at_most_zero_exactly_zero_yet_counts_them():
    """Even keys score |s| + 0.1 > 0, odd keys -|s| - 0.1 < 0: the odd keys' values get no weight (their
    dV is exactly 0) but their |exp(s) - 1| is in every row's normalizer (the reference's). A row
    whose keys all score below 0 gives exactly 0, forward and backward."""
    def signed(s, b, h, q_idx, kv_idx):
        return torch.where((kv_idx % 2 == 0) & (q_idx > 0), s.abs() + 0.1, -s.abs() - 0.1)
    spec = ag.AttentionSpec(score_mod=signed, normalization=norms.Softpick())
    q, k, v = Case(1, 2, 2, 30, 41, 16, 16, seed=4).tensors()
    assert_matches_reference(spec, q, k, v)
    out = ag.compile(spec)(q, k, v)
    out.backward(torch.randn_like(out))
    assert torch.all(v.grad[:, :, 1::2] == 0) and torch.all(v.grad[:, :, 0::2] != 0)
    assert torch.all(out[:, :, 0] == 0) and torch.all(q.grad[:, :, 0] == 0)
    with pytest.raises(ag.SpecError, match=r"stats \['lse'\] are not defined for Softpick"):
        ag.AttentionSpec(normalization=norms.Softpick(), stats=("lse",))


def test_signed_softmax_subtracts_keys_with_negative_logits():
    """Cog's weights take the logits' signs: keys scoring -|s| - 0.1 subtract their values, weighed by
    exp(|l|) like the others; a key whose score_mod gives -inf is dropped, as a masked one."""
    def signed(s, b, h, q_idx, kv_idx):
        return torch.where(kv_idx % 3 == 0, -s.abs() - 0.1, torch.where(kv_idx == 4, float("-inf"), s.abs() + 0.1))
    spec = ag.AttentionSpec(score_mod=signed, normalization=norms.SignedSoftmax())
    q, k, v = Case(1, 2, 2, 20, 30, 16, 16, seed=8).tensors(requires_grad=False)
    v = torch.ones_like(v)  # each row's output is the sum of its weights
    assert_matches_reference(spec, q, k, v)
    out = ag.compile(spec)(q, k, v)
    scores = (q @ k.transpose(-1, -2)) / 4
    magnitude = torch.exp(scores.abs() + 0.1)
    magnitude[..., 4] = 0.0
    sign = torch.ones_like(scores)
    sign[..., ::3] = -1.0
    expected = (sign * magnitude).sum(-1) / magnitude.sum(-1)
    torch.testing.assert_close(out[..., 0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", [norms.Softpick(), norms.SignedSoftmax()], ids=str)
def test_rectified_and_signed_softmax_from_the_products_in_bfloat16(norm):
    """Without a score_mod both take the scale into exp2 from the unscaled products (the signed softmax
    their magnitudes): in bfloat16 the kernels use exp2, unlike the float32 tests."""
    spec = ag.AttentionSpec(normalization=norm, mask_mod=ag.masks.causal)
    assert "_exp_shifted(logits, m_use[:, None], PRECISION, scale)" in ag.compile(spec).source
    assert_matches_reference(spec, *Case(1, 4, 2, 40, 40, 32, 16, dtype=torch.bfloat16).tensors())


def test_normalized_rows_sum_the_weights_the_product_with_v_takes():
    """Found by `attngen fuzz --half` (seed 822): in float16 the weights enter P V rounded; with the row
    sum of the unrounded ones, one kept key's output was off v by their rounding (5e-4), which
    delta = dO . O carried into dS = (dP - delta) / norm * fn' (dQ 4x its bound)."""
    factor = 0.5 * torch.randn(97, generator=torch.Generator().manual_seed(4998))

    def score_mod(s, b, h, q_idx, kv_idx):
        x = s * factor[(q_idx - kv_idx) % 97] + s
        return torch.sqrt(abs(x) * abs(x) + 1.0)
    spec = ag.AttentionSpec(score_mod=score_mod, mask_mod=lambda b, h, q_idx, kv_idx: kv_idx > q_idx, scale=0.3,
                            normalization=norms.Normalized(lambda s: torch.clamp(s, min=0.0) ** 2 + 0.1))
    q, k, v = Case(2, 4, 1, 1, 2, 64, 64, dtype=torch.float16, seed=19573).tensors()
    assert_matches_reference(spec, q, k, v, seed=19573)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_softpick_rows_sum_the_weights_the_product_with_v_takes(dtype):
    """Softpick's largest weight is 1 - exp(-m), not 1 as softmax's: rounded into P V, it left one key
    of score 0.03 with its output 1.2x its bound in bfloat16 while the normalizer summed it unrounded."""
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: 0.01 * s + 0.03,
                            mask_mod=lambda b, h, q_idx, kv_idx: kv_idx > q_idx, normalization=norms.Softpick())
    assert_matches_reference(spec, *Case(2, 4, 1, 1, 2, 64, 64, dtype=dtype, seed=5).tensors(), seed=5)


def test_spec_text_shows_the_weight_function():
    """The generated module's docstring (and `attngen show`) carries the source of an elementwise or
    normalized weight function, not only its name: it changes the cache key with the function."""
    spec = ag.AttentionSpec(normalization=norms.Normalized(lambda s: s ** 4))
    assert "norms.Normalized(lambda s: s ** 4)" in "\n".join(spec.describe())
    assert "lambda s: s ** 4" in ag.compile(spec).source


def test_custom_normalization_subclass():
    class Squared(norms.Normalization):
        family = "elementwise"

        def weight(self, score, h, n):
            return score * score / n

    variant = Variant("squared", _none, lambda c: ag.AttentionSpec(normalization=Squared()))
    check_variant(variant, Case(1, 2, 2, 21, 21, 16, 16))


@pytest.mark.parametrize("make, message", [
    (lambda: norms.Softmax(sink="big"), "must be a float or a per-head tensor"),
    (lambda: norms.Sigmoid(bias=float("nan")), "must be finite"),
    (lambda: norms.ReLU(power=4), "must be 1, 2 or 3"),
    (lambda: norms.ReLU(normalize="rows"), "count must be one of"),
    (lambda: norms.ScalableSoftmax(s=torch.ones(2, 2)), "shape \\[heads\\]"),
    (lambda: norms.Elementwise("sigmoid"), "needs a function"),
    (lambda: norms.Softpick(eps=0.0), "must be a positive float"),
    (lambda: norms.Normalized(lambda s: s, eps=-1.0), "must be a positive float"),
    (lambda: norms.Normalized("relu"), "needs a function"),
    (lambda: norms.Normalized(lambda s: s * torch.sigmoid(s)), r"needs fn\(s\) >= 0 .* but fn\(-30\) = -2.8"),
])
def test_bad_normalization_arguments(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


def test_per_head_parameter_with_wrong_length_is_rejected():
    attn = ag.compile(ag.AttentionSpec(normalization=norms.Softmax(sink=torch.zeros(3))))
    q, k, v = Case(1, 2, 2, 8, 8, 16, 16, seed=0).tensors()
    with pytest.raises(ValueError, match=r"Softmax\(sink=...\) has 3 entries; expected one per query head \(2\)"):
        attn(q, k, v)


@given(norm_name=st.sampled_from(sorted(NORMS)), variant=st.sampled_from(VARIANTS),
       q_len=st.integers(1, 70), kv_len=st.integers(1, 70), group=st.sampled_from([1, 2]), seed=st.integers(0, 99))
def test_any_normalization_with_any_score_and_mask_mod(norm_name, variant, q_len, kv_len, group, seed):
    make_captures, make_norm = NORMS[norm_name]

    def captures(case, gen):  # the normalization's parameters under their own names
        return {**variant.captures(case, gen), **{f"norm.{k}": t for k, t in make_captures(case, gen).items()}}

    def spec(c):
        own = {k.removeprefix("norm."): t for k, t in c.items() if k.startswith("norm.")}
        return dataclasses.replace(variant.spec(c), normalization=make_norm(own), stats=None)

    combined = Variant(f"{variant.name}+{norm_name}", captures, spec)
    check_variant(combined, Case(1, 2 * group, 2, q_len, kv_len, 16, 32, seed=seed))


@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_entmax_weights_have_exact_zeros_and_sum_to_one(alpha):
    """With v the identity, the output rows are the weights themselves."""
    spec = ag.AttentionSpec(normalization=norms.Entmax(alpha), score_mod=lambda s, b, h, q_idx, kv_idx: 4.0 * s)
    q, k, _ = Case(1, 2, 2, 24, 32, 16, 32, seed=3).tensors(requires_grad=False)
    v = torch.eye(32).expand(1, 2, 32, 32)
    weights = ag.compile(spec)(q, k, v)
    expected = ag.reference.attention(q.double(), k.double(), v.double(), spec)
    assert torch.equal(weights == 0, expected == 0) and (weights == 0).float().mean() > 0.3
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 24), atol=1e-5, rtol=0)


def test_sparsemax_with_its_support_among_the_largest_logits_needs_one_pass():
    """The first tau solves each row's 16 largest logits (two per kv tile) alone; where they hold the
    row's support it is exact, and one pass over the keys confirms it (Newton from the bracket's end,
    the largest logit - 1, needs two here). Four keys stand out in every row, two in one tile."""
    gen = torch.Generator().manual_seed(5)
    q = torch.cat([torch.full((1, 2, 64, 1), 4.0), 0.3 * torch.randn(1, 2, 64, 15, generator=gen)], -1)
    k = torch.cat([0.1 * torch.randn(1, 2, 256, 1, generator=gen), 0.3 * torch.randn(1, 2, 256, 15, generator=gen)], -1)
    standing_out = [5, 6, 133, 134]
    k[..., standing_out, 0] = torch.tensor([1.9, 1.6, 1.7, 1.3])
    v = torch.randn(1, 2, 256, 16, generator=gen)
    logits = (q @ k.transpose(-1, -2)).double() / 4
    ranked = logits.sort(-1, descending=True).values
    support = (1 + torch.arange(1, 257) * ranked > ranked.cumsum(-1)).sum(-1, keepdim=True)
    tau = (ranked.cumsum(-1).gather(-1, support - 1) - 1) / support
    others = torch.ones(256, dtype=torch.bool)
    others[standing_out] = False
    assert (support >= 2).all() and not (logits[..., others] > tau).any()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert_matches_reference(ag.AttentionSpec(normalization=norms.Sparsemax(iterations=1)), q, k, v)


@pytest.mark.parametrize("helper, normalization, exact, rel_bound", [
    ("_log1p_unit", norms.StickBreaking(), torch.log1p, 1e-6),  # log sigmoid's log(1 + u), u = exp(-|l|)
    ("_one_over_one_plus", norms.Sigmoid(), lambda u: 1 / (1 + u), 2e-7),  # sigmoid's and tanh's 1 / (1 + u)
])
def test_kernel_helpers_on_the_unit_interval_are_float32_exact(helper, normalization, exact, rel_bound, monkeypatch):
    """The polynomial and Newton-step helpers the kernels use instead of tl.log and a division, at
    100001 points of [0, 1]: within 2e-7 absolute and ``rel_bound`` relative (tl.log(1 + u) rounds
    1 + u first: 6e-8 absolute, but not relative)."""
    u = torch.linspace(0, 1, 100001)
    out = apply_kernel_helper(ag.AttentionSpec(normalization=normalization), helper, u, monkeypatch)
    expected = exact(u.double())
    error = (out.double() - expected).abs()
    assert error.max() < 2e-7 and (error[1:] / expected[1:].abs()).max() < rel_bound


@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_threshold_with_tied_largest_logits(alpha):
    """Each row's threshold starts from its 16 largest logits, two per kv tile, which keep one copy of a
    tied value: three equal keys in one tile (every row's top three, all in the support), and pairs of
    equal keys alone in their tiles. The passes over the keys must find the true threshold; a check that
    skipped them where the logits left out looked below it failed both cases when it missed the ties."""
    gen = torch.Generator().manual_seed(2)
    q = torch.cat([torch.full((1, 2, 40, 1), 4.0), 0.2 * torch.randn(1, 2, 40, 15, generator=gen)], -1)
    k = torch.cat([0.3 * torch.randn(1, 2, 256, 1, generator=gen), 0.2 * torch.randn(1, 2, 256, 15, generator=gen)], -1)
    k[..., 5, 0] = 1.5
    k[..., 6:8, :] = k[..., 5:6, :]
    v = torch.randn(1, 2, 256, 16, generator=gen)
    spec = ag.AttentionSpec(normalization=norms.Entmax(alpha))
    weights = ag.reference.attention(q.double(), k.double(), torch.eye(256).double().expand(1, 2, 256, 256), spec)
    assert (weights[..., 5:8] > 0.2).all()  # the premise: the tied keys are in every row's support
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert_matches_reference(spec, q, k, v)
    # two equal keys alone in their tile (a score_mod leaves 2 of every 64): the second largest is -inf there
    k = k.detach().clone()
    k[..., 1::64, :] = k[..., 0::64, :]
    pairs = ag.AttentionSpec(normalization=norms.Entmax(alpha),
                             score_mod=lambda s, b, h, q_idx, kv_idx: torch.where(kv_idx % 64 < 2, s, float("-inf")))
    assert_matches_reference(pairs, q, k.requires_grad_(), v)


@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_entmax_rows_a_score_mod_sends_to_minus_inf_are_as_fully_masked_ones(alpha):
    """Rows whose kept keys all score -inf have no threshold to find: output 0, and gradients as the
    reference's (the kernel starts such rows at tau 0 and leaves them out of its stopping test)."""
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: torch.where(q_idx < 3, float("-inf"), s),
                            mask_mod=ag.masks.causal, normalization=norms.Entmax(alpha))
    case = Case(1, 2, 2, 40, 40, 16, 16, seed=1)
    assert torch.all(ag.compile(spec)(*case.tensors())[:, :, :3] == 0)
    assert_matches_reference(spec, *case.tensors())


def test_entmax_arguments():
    for bad in (1.0, 2.5, "x"):
        with pytest.raises(ValueError, match=r"alpha=...\) must be a number in \(1, 2\]"):
            norms.Entmax(bad)
    with pytest.raises(ValueError, match="iterations"):
        norms.Entmax(1.5, iterations=0)
    with pytest.raises(TypeError, match=r"Entmax\(alpha=...\) must be a float or a floating-point tensor of shape"):
        norms.Entmax(torch.tensor([2, 2]))
    q = torch.randn(1, 2, 8, 16)
    for alpha, message in ((torch.tensor([1.5, 2.5]), r"must be in \(1, 2\] for every head, got \[1.5, 2.5\]"),
                           (torch.tensor([1.5, 1.5, 1.5]), r"has 3 entries; expected one per query head \(2\)")):
        with pytest.raises(ValueError, match=message):
            ag.compile(ag.AttentionSpec(normalization=norms.Entmax(alpha)))(q, q, q)


def test_entmax_alpha_out_of_range_gives_its_head_nan_where_unchecked(monkeypatch):
    """A GPU call does not read alpha to check it (a device synchronization every step): the kernels turn
    a head's alpha outside (1, 2] into NaN outputs and a NaN alpha gradient for that head alone (as if
    unchecked here), never into quiet zeros."""
    monkeypatch.setattr("attngen.runtime.compiled.check_entmax_alpha", lambda name, alpha: None)
    alpha = torch.tensor([1.5, 2.5, 1.0], requires_grad=True)
    q, k, v = Case(1, 3, 3, 20, 20, 16, 16, seed=4).tensors()
    out = ag.compile(ag.AttentionSpec(normalization=norms.Entmax(alpha), mask_mod=ag.masks.causal))(q, k, v)
    out.sum().backward()
    assert torch.isfinite(out[:, 0]).all() and torch.isnan(out[:, 1:]).all()
    assert torch.isfinite(alpha.grad[0]) and torch.isnan(alpha.grad[1:]).all()
    with pytest.raises(ag.SpecError, match="no log-sum-exp"):
        ag.AttentionSpec(normalization=norms.Sparsemax(), stats=("lse",))
