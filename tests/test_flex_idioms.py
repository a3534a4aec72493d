"""Mods written the way FlexAttention's users write them (attention-gym's masks and mods): captured
tensors indexed one dimension at a time, rows reduced with torch.dot, bit shifts. FlexAttention applies
mods through torch.vmap, so each sees 0-d tensors; the float64 reference does the same, and these tests
also check it against masks and scores built entry by entry in plain Python."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import attngen as ag
from attngen import masks, norms, reference
from attngen.testing import assert_matches_reference
from variants import Case

# Flamingo's cross-attention: text token i sees the images whose interval [start, end) holds it
IMAGE_TOKENS = 6
INTERVALS = torch.tensor([[0, 11], [4, 20], [20, 29]])
IMAGE_OF_KEY = torch.arange(3).repeat_interleave(IMAGE_TOKENS)


def _cross_attention_mask(b, h, q_idx, kv_idx):
    interval = INTERVALS[IMAGE_OF_KEY[kv_idx]]  # a row: the image's [start, end)
    return (q_idx >= interval[0]) & (q_idx < interval[1])


def _dense_mask(mask_of, q_len: int, kv_len: int) -> torch.Tensor:
    return torch.tensor([[mask_of(i, j) for j in range(kv_len)] for i in range(q_len)])


def test_flex_attentions_own_mask_combinators():
    """torch's and_masks / or_masks / noop_mask start from ``b.new_ones((), dtype=torch.bool)``; with them
    the masks are those of attngen's own combinators, and the kernels match the reference."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def window(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= 8

    def prefix(b, h, q_idx, kv_idx):
        return kv_idx < 5

    q, k, v = Case(1, 2, 2, 40, 40, 16, 16, seed=4).tensors()
    for mask_mod, ours in [(flex.and_masks(causal, window), lambda i, j: i >= j and i - j <= 8),
                           (flex.or_masks(prefix, causal), lambda i, j: j < 5 or i >= j),
                           (flex.noop_mask, lambda i, j: True)]:
        spec = ag.AttentionSpec(mask_mod=mask_mod, score_mod=lambda s, b, h, q_idx, kv_idx: s + s.new_full((), 0.5))
        _, keep = reference.scores(q.double(), k.double(), spec)
        assert torch.equal(keep[0, 0], _dense_mask(ours, 40, 40))
        assert_matches_reference(spec, q, k, v)
    with pytest.raises(ag.SpecError, match=r"traced values are scalars: .new_ones\(\(\)\) makes one, not "
                                           r".new_ones\(\(2,\)\)"):
        ag.compile(ag.AttentionSpec(mask_mod=lambda b, h, q_idx, kv_idx: b.new_ones((2,), dtype=torch.bool)))


def test_captured_tensor_indexed_a_dimension_at_a_time():
    """``INTERVALS[image][0]`` and ``bias[h][q_idx - kv_idx + 20]`` (a learnable table): the kernels read
    the entry the full index names, gradients included; rows 29 and past see no image (fully masked)."""
    bias = (0.1 * torch.randn(4, 52, dtype=torch.float64)).float().requires_grad_()
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + bias[h][q_idx - kv_idx + 20],
                            mask_mod=_cross_attention_mask)
    q, k, v = Case(2, 4, 2, 32, 3 * IMAGE_TOKENS, 16, 16, seed=3).tensors()
    expected = _dense_mask(lambda i, j: bool(INTERVALS[j // IMAGE_TOKENS, 0] <= i < INTERVALS[j // IMAGE_TOKENS, 1]),
                           32, 3 * IMAGE_TOKENS)
    scores, keep = reference.scores(q.double(), k.double(), spec)
    assert torch.equal(keep, expected.expand_as(keep))
    plain = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2) / 4.0
    offsets = torch.arange(32)[:, None] - torch.arange(18) + 20
    assert torch.allclose(scores[keep], (plain + bias.double()[:, offsets][None])[keep])
    assert_matches_reference(spec, q, k, v)


def test_torch_dot_of_rows_is_attention_over_the_concatenated_dims():
    """DeepSeek's decoupled rotary part as attention-gym's MLA score_mod writes it,
    ``s + torch.dot(q_rope[b, h, q_idx], k_rope[b, h // 2, kv_idx])``: with scale 1 it is plain attention
    over q and k with the rotary dims appended, and matches the reference with learnable rows."""
    case = Case(1, 4, 2, 24, 40, 16, 16, seed=5)
    q, k, v = case.tensors()
    gen = torch.Generator().manual_seed(0)
    q_rope = torch.randn(1, 4, 24, 8, generator=gen).requires_grad_()
    k_rope = torch.randn(1, 2, 40, 8, generator=gen).requires_grad_()
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx:
                            s + torch.dot(q_rope[b, h, q_idx], k_rope[b, h // 2, kv_idx]),
                            mask_mod=ag.masks.causal, scale=1.0)
    out = ag.compile(spec)(q, k, v)
    appended = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal, scale=1.0))(
        torch.cat([q, q_rope], -1), torch.cat([k, k_rope], -1), v)
    torch.testing.assert_close(out, appended, rtol=0, atol=2e-5)
    assert_matches_reference(spec, q, k, v)


def test_row_products_as_matmul_inner_and_sum():
    """``w[h] @ row``, ``torch.inner``, ``row.sum()`` and a dot with a plain 1-d tensor."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 4, generator=gen)
    feats = torch.randn(30, 4, generator=gen)
    mix = torch.randn(4, generator=gen)

    def score_mod(s, b, h, q_idx, kv_idx):
        return (s + 0.3 * (w[h] @ feats[kv_idx]) - 0.2 * torch.inner(feats[q_idx], feats[kv_idx])
                + 0.1 * feats[q_idx].sum() + 0.1 * torch.dot(mix, feats[kv_idx]))

    q, k, v = Case(1, 2, 2, 30, 30, 16, 16).tensors()
    scores, _ = reference.scores(q.double(), k.double(), ag.AttentionSpec(score_mod=score_mod))
    i, j = 7, 19
    by_hand = (q[0, 1, i].double() @ k[0, 1, j].double() / 4.0 + 0.3 * (w[1] @ feats[j]) - 0.2 * feats[i] @ feats[j]
               + 0.1 * feats[i].sum() + 0.1 * mix @ feats[j])
    assert torch.isclose(scores[0, 1, i, j], by_hand.double(), atol=1e-6)
    assert_matches_reference(ag.AttentionSpec(score_mod=score_mod), q, k, v)


def _deinterleave(code):
    """Every other bit of ``code`` (from bit 0), packed: a Morton code's x."""
    code = code & 0x55555555
    code = (code | (code >> 1)) & 0x33333333
    code = (code | (code >> 2)) & 0x0F0F0F0F
    code = (code | (code >> 4)) & 0x00FF00FF
    return (code | (code >> 8)) & 0x0000FFFF


def _interleave(x):
    x = (x | (x << 8)) & 0x00FF00FF
    x = (x | (x << 4)) & 0x0F0F0F0F
    x = (x | (x << 2)) & 0x33333333
    return (x | (x << 1)) & 0x55555555


def _morton_neighborhood(b, h, q_idx, kv_idx):
    """A 3 x 3 neighborhood on an 8 x 8 canvas whose tokens are in Morton (Z) order, as attention-gym's
    NATTEN variant lays them out; the key's code is rebuilt with << to use both shifts."""
    q_x, q_y = _deinterleave(q_idx), _deinterleave(q_idx >> 1)
    kv_x, kv_y = _deinterleave(kv_idx), _deinterleave(kv_idx >> 1)
    kv_code = (_interleave(kv_y) << 1) | _interleave(kv_x)
    near = ((q_x.clamp(1, 6) - kv_x).abs() <= 1) & ((q_y.clamp(1, 6) - kv_y).abs() <= 1)
    return near & (kv_code == kv_idx)


def test_bit_shifts_of_morton_codes():
    """``>>`` and ``<<`` on indices (Morton-order neighborhoods): the mask is the neighborhood the
    canvas coordinates give, and the kernels match the reference."""
    spec = ag.AttentionSpec(mask_mod=_morton_neighborhood)
    q, k, v = Case(1, 2, 2, 64, 64, 16, 16, seed=2).tensors()

    def coordinates(code: int) -> tuple[int, int]:
        return (sum(((code >> (2 * i)) & 1) << i for i in range(3)),
                sum(((code >> (2 * i + 1)) & 1) << i for i in range(3)))

    def near(i, j):
        (qx, qy), (kx, ky) = coordinates(i), coordinates(j)
        return abs(min(max(qx, 1), 6) - kx) <= 1 and abs(min(max(qy, 1), 6) - ky) <= 1

    _, keep = reference.scores(q.double(), k.double(), spec)
    assert torch.equal(keep[0, 0], _dense_mask(near, 64, 64))
    assert_matches_reference(spec, q, k, v)
    shifted = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + 0.01 * ((kv_idx - 30) >> 2)
                               + 0.001 * torch.bitwise_left_shift(q_idx, 3) + 0.1 * (h << 1))
    assert_matches_reference(shifted, q, k, v)  # negative values shift as floor(x / 2**n)


@pytest.mark.parametrize("score_mod, message", [
    (lambda s, b, h, q_idx, kv_idx: s + (1 << kv_idx), r"bit shifts take a Python int amount from 0 to 30"),
    (lambda s, b, h, q_idx, kv_idx: s + (q_idx >> 31), r"bit shifts take a Python int amount from 0 to 30"),
    (lambda s, b, h, q_idx, kv_idx: s + (q_idx.float() << 2), r"bit shifts take an integer, not a float value"),
    (lambda s, b, h, q_idx, kv_idx: s + torch.dot(_ROWS[q_idx], _ROWS[kv_idx, :3]), r"no slices"),
    (lambda s, b, h, q_idx, kv_idx: s + torch.dot(_ROWS[q_idx], _SHORT[kv_idx]), r"torch.dot of rows of 4 and 3"),
    (lambda s, b, h, q_idx, kv_idx: s + _ROWS[q_idx] * 2, r"a vector of 4 entries is used as a value"),
    (lambda s, b, h, q_idx, kv_idx: s + _TABLE[h].sum(), r"reduce a vector: .* got a captured tensor of "
                                                         r"shape \(2, 64, 4\) indexed at 1"),
    (lambda s, b, h, q_idx, kv_idx: s + (_ROWS[q_idx] * _SHORT[kv_idx]).sum(), r"vectors of 3 and 4 entries in one "
                                                                                r"operation"),
    (lambda s, b, h, q_idx, kv_idx: s + torch.dot(_LONG[q_idx], _LONG[kv_idx]), r"has 300 entries; the kernels "
                                                                                r"reduce at most 256"),
], ids=["traced_amount", "amount_31", "float_shift", "slice", "lengths", "vector_as_value", "row_of_rows",
        "vector_lengths", "long_row"])
def test_unsupported_rows_and_shifts_are_named(score_mod, message):
    with pytest.raises(ag.SpecError, match=message):
        ag.compile(ag.AttentionSpec(score_mod=score_mod))


_ROWS, _SHORT, _TABLE, _LONG = torch.randn(64, 4), torch.randn(64, 3), torch.randn(2, 64, 4), torch.randn(64, 300)


def test_rows_read_at_loaded_indices_are_bounds_checked():
    """An image id past INTERVALS' rows is refused before a kernel reads past the table."""
    image_of_key = IMAGE_OF_KEY.clone()
    image_of_key[5] = 3

    def mask_mod(b, h, q_idx, kv_idx):
        interval = INTERVALS[image_of_key[kv_idx]]
        return (q_idx >= interval[0]) & (q_idx < interval[1])

    q = torch.randn(1, 2, 32, 16)
    k = torch.randn(1, 2, 3 * IMAGE_TOKENS, 16)
    with pytest.raises(ValueError, match=r"captured tensor #1 of shape \(3, 2\) is indexed in dim 0 with an "
                                         r"expression of kv_idx through the values of captured tensor #0 that "
                                         r"runs from 0 to 3"):
        ag.compile(ag.AttentionSpec(mask_mod=mask_mod))(q, k, k)


def test_dtype_attributes_and_type_as():
    """``x.type_as(score)``, ``x.to(score)``, ``x.to(score.dtype)``; a traced value's dtype is the kernels' (the
    reference's differ: float64 there), so ``torch.finfo(score.dtype)`` is float32's."""
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx:
                            s + (q_idx - kv_idx).type_as(s) * 0.01 + kv_idx.to(s) * 0.001 + h.to(s.dtype) * 0.1)
    assert_matches_reference(spec, *Case(1, 2, 2, 20, 20, 16, 16).tensors())
    seen = {}

    def score_mod(s, b, h, q_idx, kv_idx):
        seen.update(score=s.dtype, index=q_idx.dtype, mask=(q_idx > 0).dtype, min=torch.finfo(s.dtype).min)
        return s

    ag.compile(ag.AttentionSpec(score_mod=score_mod))
    assert seen == dict(score=torch.float32, index=torch.int32, mask=torch.bool, min=torch.finfo(torch.float32).min)


def test_numpy_scalars_are_constants():
    """numpy's scalars (a window from a config, a slope from an array) trace as the Python numbers they hold, on
    either side of an operator and as indices: the same graph as the spec written with Python numbers."""
    bias = torch.linspace(-1.0, 1.0, 3 * 20).reshape(3, 20)

    def spec(window, half, row, first=0):
        return ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: half * s + bias[row, kv_idx] - s * half,
                                mask_mod=lambda b, h, q_idx, kv_idx: (q_idx - kv_idx < window) & (kv_idx <= q_idx)
                                & (first <= kv_idx))

    numpy_spec = spec(np.int64(5), np.float32(0.75), np.int64(1))
    assert ag.compile(numpy_spec).graph.text() == ag.compile(spec(5, 0.75, 1)).graph.text()
    q, k, v = Case(1, 2, 2, 20, 20, 16, 16).tensors()
    assert_matches_reference(numpy_spec, q, k, v)
    # a comparison with the numpy scalar on its left is numpy's (greater_equal(2, kv_idx)), Python's the mirror
    left = spec(np.int64(5), np.float32(0.75), np.int64(1), first=np.int64(2))
    assert torch.equal(ag.compile(left)(q, k, v), ag.compile(spec(5, 0.75, 1, first=2))(q, k, v))


def _numeric_arguments(n):
    """Specs built from the numbers of ``n`` (Python's or numpy's), one per argument that takes a number."""
    return [ag.AttentionSpec(scale=n.scale, dropout_p=n.rate, mask_mod=masks.sliding_window(n.window, n.size)),
            ag.AttentionSpec(top_k=n.size, normalization=norms.Entmax(n.alpha, iterations=n.size)),
            ag.AttentionSpec(normalization=norms.Softmax(sink=n.scale), mask_mod=masks.chunked(n.size)),
            ag.AttentionSpec(normalization=norms.AffineSoftmax(n.alpha, n.scale), mask_mod=masks.prefix_lm(n.window)),
            ag.AttentionSpec(normalization=norms.ScalableSoftmax(n.alpha), stats=ag.stats.pooled(n.size, n.window)),
            ag.AttentionSpec(normalization=norms.Sigmoid(n.scale)),
            ag.AttentionSpec(normalization=norms.ReLU(n.size)),
            ag.AttentionSpec(differential=n.rate),
            ag.LinearAttentionSpec(decay=n.rate, scale=n.scale, eps=n.rate)]


def test_numpy_scalars_as_arguments_are_the_numbers_they_hold():
    """A number from a config or an array may be numpy's (np.float32(0.25), np.int64(3)) wherever an argument
    takes a number: the spec, its description, its kernels and a call's result are those of Python's number."""
    class Numbers:
        def __init__(self, real, integer):
            self.scale, self.rate, self.alpha = real(0.25), real(0.125), real(1.5)
            self.window, self.size = integer(5), integer(2)

    plain, numpy = Numbers(float, int), Numbers(np.float32, np.int64)
    for python_spec, numpy_spec in zip(_numeric_arguments(plain), _numeric_arguments(numpy), strict=True):
        assert numpy_spec.describe() == python_spec.describe()
        assert ag.compile(numpy_spec).key == ag.compile(python_spec).key
    q, k, v = Case(2, 2, 2, 6, 20, 16, 16).tensors()
    attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal, dropout_p=0.25))
    calls = [dict(kv_lens=9, q_offset=3, seed=7), dict(kv_lens=np.int64(9), q_offset=np.int32(3), seed=np.int64(7))]
    assert torch.equal(attn(q, k, v, **calls[0]), attn(q, k, v, **calls[1]))
    assert_matches_reference(ag.AttentionSpec(mask_mod=ag.masks.causal), q, k, v, kv_lens=np.int64(9))


def test_library_masks_compute_with_python_ints_whatever_sizes_they_are_given():
    """A mask's sizes from numpy (np.uint8 from a compact config, np.int16) are used as Python ints: their
    products inside the mask (window x dilation, height x width) overflowed numpy's type before, leaving a
    dilated window of 16 x 16 with no key (uint8: 256 wraps to 0) and no error."""
    q_idx, kv_idx = torch.arange(300)[:, None], torch.arange(300)[None]
    for make, small in ((lambda n: masks.dilated_sliding_window(n(16), n(16)), np.uint8),
                        (lambda n: masks.neighborhood_3d(n(2), n(200), n(200), n(3)), np.int16)):
        python, numpy = make(int), make(small)
        expected = python(0, 0, q_idx, kv_idx)
        assert expected.any() and torch.equal(numpy(0, 0, q_idx, kv_idx), expected), python.name
        assert ag.compile(ag.AttentionSpec(mask_mod=numpy)).key == ag.compile(ag.AttentionSpec(mask_mod=python)).key


@pytest.mark.parametrize("make, message", [
    (lambda: ag.AttentionSpec(top_k=np.bool_(True)), "top_k must be a positive int"),
    (lambda: ag.AttentionSpec(scale=np.bool_(True)), "scale must be a finite number"),
    (lambda: ag.AttentionSpec(scale=np.float32("nan")), "scale must be a finite number"),
    (lambda: norms.Entmax(np.float32(2.5)), r"Entmax\(alpha=...\) must be a number in \(1, 2\]"),
    (lambda: norms.ReLU(power=True), r"ReLU\(power=...\) must be 1, 2 or 3"),
    (lambda: masks.sliding_window("8"), "sliding_window: left must be an int >= 0"),
    (lambda: masks.prefix_lm(-1), "prefix_lm: prefix must be an int >= 0"),
    (lambda: masks.chunked(np.float32(4)), "chunked: size must be a positive int"),
    (lambda: ag.BlockMask(torch.ones(1, 1, 1, 1, dtype=torch.bool), 1.5), "block_size must be a positive int"),
])
def test_numbers_that_are_not_of_the_kind_asked_are_refused(make, message):
    """bools (Python's or numpy's), floats where an int is asked and NaN are refused, naming the argument."""
    with pytest.raises((ValueError, TypeError), match=message):
        make()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scores_set_to_a_large_negative_number_warn_and_give_torchs_forward(dtype):
    """A row whose every key ``torch.where`` sets to finfo.min has weights 1 / n in torch: so in the forward
    kernels, for 16-bit inputs too (whose exp2 form would overflow there: NaN), but its gradients come from
    an lse that rounded log(n) away; compiling says so. -inf (or mask_mod) drops keys exactly and does not
    warn."""
    def score_mod(s, b, h, q_idx, kv_idx):
        return torch.where((q_idx >= kv_idx) & (q_idx > 4), s, torch.finfo(s.dtype).min)

    with pytest.warns(UserWarning, match=r"score_mod sets scores to -3.40282e\+38 with torch.where: where a row's "
                                         r"every key gets it, float32's log-sum-exp rounds log\(n\) away") as seen:
        attn = ag.compile(ag.AttentionSpec(score_mod=score_mod))
    assert {w.filename for w in seen if "sets scores" in str(w.message)} == {__file__}  # the line that compiled it
    q, k, v = (t.to(dtype) for t in Case(1, 2, 2, 40, 40, 16, 16).tensors(requires_grad=False))
    expected, stats = reference.attention(q.double(), k.double(), v.double(), ag.AttentionSpec(score_mod=score_mod),
                                          return_stats=True)
    out, got = attn(q, k, v, return_stats=True)
    atol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=atol)
    torch.testing.assert_close(got.lse[:, :, 5:].double(), stats.lse[:, :, 5:], rtol=0, atol=1e-5)
    assert (got.lse[:, :, :5] == torch.finfo(torch.float32).min).all()  # the reference's is float64's min
    torch.testing.assert_close(expected[:, :, :5], v.double().mean(2, keepdim=True).expand(1, 2, 5, 16))
    with pytest.warns(UserWarning, match="score_mod sets scores to") as seen:
        ag.attention(q, k, v, score_mod)
    assert {w.filename for w in seen if "sets scores" in str(w.message)} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx:
                                    torch.where(q_idx >= kv_idx, s, float("-inf"))))


def test_reference_softmax_keeps_its_precision_at_any_magnitude():
    """Rows of scores near -1e300 (float64): the reference's weights and gradients are torch.softmax's,
    where exp(s - lse) would give weights 1 (lse rounds log(n) away)."""
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: torch.where(q_idx > 3, s, s - 1e300))
    q, k, v = (t.double() for t in Case(1, 2, 2, 12, 12, 8, 8).tensors(requires_grad=False))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = reference.attention(*leaves, spec)
    scores = leaves[0] @ leaves[1].transpose(-1, -2) / 8 ** 0.5
    scores = torch.where(torch.arange(12)[:, None] > 3, scores, scores - 1e300)
    by_torch = torch.softmax(scores, -1) @ leaves[2]
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    torchs = torch.autograd.grad(by_torch, leaves, grad)
    torch.testing.assert_close(out, by_torch)
    for a, b in zip(ours, torchs):
        torch.testing.assert_close(a, b)


@torch.library.custom_op("attngen_test::sigmoid", mutates_args=())
def _clamped(x: torch.Tensor) -> torch.Tensor:
    """A custom op that only shares torch.sigmoid's name."""
    return x.clamp(0.0, 1.0)


def test_custom_ops_are_refused_and_aten_ops_traced():
    """A custom op is not traced by its name (``attngen_test::sigmoid`` clamps); torch.ops.aten's are, by the
    function they overload."""
    with pytest.raises(ag.SpecError, match=r"the custom op attngen_test.sigmoid cannot be traced"):
        ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: torch.ops.attngen_test.sigmoid(s)))
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx:
                            torch.ops.aten.mul.Tensor(torch.ops.aten.tanh(s / 4.0), 4.0))
    assert_matches_reference(spec, *Case(1, 2, 2, 20, 20, 16, 16).tensors())


_TIED = torch.tensor([4.0, 1.0])


def test_gradients_at_ties_and_kinks_are_torchs():
    """Integer-valued floats meet exactly: torch.maximum / minimum / two-tensor max split a tie's gradient in
    half, relu, abs, hardtanh, relu6 and hardsigmoid give 0 at their kinks, clamp 1 at its bounds, hardswish
    1 at 3; a vector's amax / amin spread it over its tied entries, its max() / min() give it to the first
    (as they do under vmap, FlexAttention's way of running mods). Every kink is at an integer distance,
    where the learnable offset w[1] or bound w[3] feels it; the vector's entries 4 w[0] and w[1] tie."""
    F = torch.nn.functional
    w = torch.tensor([0.25, 1.0, 0.5, 16.0], requires_grad=True)

    def score_mod(s, b, h, q_idx, kv_idx):
        x = (q_idx - kv_idx).float()
        return (s + 0.1 * torch.maximum(q_idx.float(), w[3]) + 0.1 * torch.minimum(x * w[1], w[0] * 8.0)
                + 0.1 * torch.max(x * w[0], w[1]) + 0.1 * F.relu(x * w[0] - w[1]) + 0.1 * torch.abs(x * w[2] - w[1])
                + 0.1 * F.hardtanh(x * w[0] - w[1]) + 0.1 * F.relu6(x - w[1]) + 0.1 * F.hardsigmoid(x - w[1])
                + 0.1 * F.hardswish(x - w[1]) + 0.1 * torch.clamp(x * w[2] - w[1], -1.0, 1.0)
                + 0.1 * (x * w[:2] * _TIED).max() + 0.1 * (x * w[:2] * _TIED).min()
                + 0.1 * (x * w[:2] * _TIED).amax() + 0.1 * torch.amin(x * w[:2] * _TIED))

    assert_matches_reference(ag.AttentionSpec(score_mod=score_mod), *Case(1, 2, 2, 24, 24, 16, 16).tensors())


def test_vectors_over_a_captured_tensors_last_dimension():
    """FIRE's hidden layer (spec file) is ``torch.relu(W1 * x + B1)`` over a one-dimensional tensor; here also
    products of rows, elementwise functions, sum / mean / max / min, len() and iteration, zeros_like /
    full_like of a vector (a vector of constants), with learnable weights, against torch's (vmap)
    evaluation of the same mod."""
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(30, 4, generator=gen)
    weight = torch.randn(4, generator=gen).requires_grad_()

    def score_mod(s, b, h, q_idx, kv_idx):
        d = feats[q_idx] - feats[kv_idx]
        return (s - 0.1 * (d * d * weight).sum() + 0.05 * torch.tanh(d).max() + 0.05 * d.abs().mean()
                - 0.05 * torch.min(d + weight) + 0.01 * sum(x for x in feats[kv_idx]) + 0.01 * len(d)
                + 0.1 * torch.dot(torch.maximum(d, torch.zeros_like(d)), torch.full_like(weight, 0.5) + weight)
                + 0.1 * (torch.ones_like(d) @ d) + 0.01 * len(torch.zeros_like(weight)))

    assert_matches_reference(ag.AttentionSpec(score_mod=score_mod), *Case(1, 2, 2, 30, 30, 16, 16).tensors())
