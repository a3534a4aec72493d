"""Generated kernels (CPU: Triton's interpreter) against the float64 reference."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attngen as ag
from attngen.testing import assert_matches_reference
from checks import apply_kernel_helper, apply_score_fn, check_variant, fills, variant_inputs
from variants import VARIANTS, Case, case_id

CASES = [
    Case(1, 2, 2, 1, 1, 16, 16),        # single query, single key
    Case(1, 2, 2, 17, 17, 32, 32),      # odd length, one partial block
    Case(2, 2, 1, 100, 100, 64, 32),    # batch 2, GQA 2:1, Dqk != Dv
    Case(1, 2, 2, 129, 129, 32, 32),    # one past a block boundary
    Case(1, 1, 1, 256, 256, 16, 16),    # longest
    Case(1, 8, 2, 33, 70, 64, 32),      # GQA 8:2, Lq < Lk
    Case(1, 2, 2, 70, 33, 16, 16),      # Lq > Lk
    Case(1, 2, 1, 40, 50, 40, 24),      # head dims that are not powers of two (q, k: 32 + 16 columns)
    Case(1, 4, 1, 19, 23, 576, 512),    # MLA's (absorbed): MQA, Dqk 576 = 512 + 64 rotary, Dv 512
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_matches_reference(variant, case):
    check_variant(variant, case)


@given(variant=st.sampled_from(VARIANTS), batch=st.integers(1, 2), kv_heads=st.integers(1, 2),
       group=st.sampled_from([1, 2, 4]), q_len=st.integers(1, 80), kv_len=st.integers(1, 80),
       qk_dim=st.sampled_from([16, 24, 32, 64]), v_dim=st.sampled_from([16, 40, 64]), seed=st.integers(0, 99))
def test_random_shapes_match_reference(variant, batch, kv_heads, group, q_len, kv_len, qk_dim, v_dim, seed):
    check_variant(variant, Case(batch, kv_heads * group, kv_heads, q_len, kv_len, qk_dim, v_dim, seed=seed))


@pytest.mark.parametrize("name, exact", [("_log1p", torch.log1p), ("_expm1", torch.expm1), ("_atan", torch.atan)],
                         ids=["log1p", "expm1", "atan"])
def test_log1p_expm1_and_atan_keep_float32_relative_precision(name, exact, monkeypatch):
    """The kernels' log1p, expm1 and atan within 3 float32 ulps (relative) of float64's at magnitudes
    1e-30 to 1e30 of both signs, where log(1 + x) and exp(x) - 1 lose every digit below 6e-8; exact at
    0, -0, -1, the infinities and NaN."""
    magnitudes = torch.logspace(-30, 30, 6001, dtype=torch.float64).float()
    x = torch.cat([magnitudes, -magnitudes, torch.tensor([0.0, -0.0, -1.0, float("inf"), float("-inf"), float("nan")])])
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: exact(s))  # a module keeps the helpers it calls
    out = apply_kernel_helper(spec, name, x, monkeypatch)
    torch.testing.assert_close(out.double(), exact(x.double()).float().double(), rtol=3 * 2**-23, atol=0.0,
                               equal_nan=True)


_F = torch.nn.functional
COMPOSED = {
    "sinh": torch.sinh,
    "cosh": torch.cosh,
    "asinh": torch.asinh,
    "acosh": torch.acosh,
    "atanh": torch.atanh,
    "atan": torch.atan,
    "asin": torch.asin,
    "acos": torch.acos,
    "atan2": lambda t: torch.atan2(t, torch.full_like(t, 2.0)),
    "atan2_negative_x": lambda t: torch.atan2(t, torch.full_like(t, -2.0)),
    "atan2_of_a_constant": lambda t: torch.atan2(torch.full_like(t, 0.5), t),
    "hypot": lambda t: torch.hypot(t, torch.full_like(t, 3.0)),
    "hypot_of_nan_and_inf": lambda t: torch.hypot(t, torch.where(torch.isnan(t), math.inf, 3.0)),
    "xlogy": lambda t: torch.xlogy(t, torch.full_like(t, 2.0)),
    "xlog1py": lambda t: torch.special.xlog1py(t, 2.0 * t),
    "xlog1py_of_minus_one": lambda t: torch.special.xlog1py(t, torch.full_like(t, -1.0)),  # 0 at 0, not NaN
    "frac": torch.frac,
    "expm1": torch.expm1,
    "special_expm1": torch.special.expm1,
    "log1p": torch.log1p,
    "softplus": _F.softplus,
    "logsigmoid": _F.logsigmoid,
    "erf": torch.erf,
    "elu": _F.elu,
    "selu": _F.selu,
    "celu": _F.celu,
    "leaky_relu": _F.leaky_relu,
    "softsign": _F.softsign,
    "relu": torch.relu,
    "clamp": lambda t: torch.clamp(t, -1.0, 2.0),
    "maximum": lambda t: torch.maximum(t, torch.full_like(t, -0.5)),
    "two_tensor_min": lambda t: torch.min(t, torch.full_like(t, 0.5)),
    "fmax": lambda t: torch.fmax(torch.full_like(t, 0.5), t),
    "fmin": lambda t: torch.fmin(t, torch.full_like(t, -0.5)),
    "hardtanh": _F.hardtanh,
    "relu6": _F.relu6,
    "hardsigmoid": _F.hardsigmoid,
    "hardswish": _F.hardswish,
    "softshrink": _F.softshrink,
    "hardshrink": _F.hardshrink,
    "threshold": lambda t: _F.threshold(t, 0.5, -2.0),
    "logaddexp": lambda t: torch.logaddexp(t, torch.full_like(t, 1.0)),
    "logaddexp2": lambda t: torch.logaddexp2(t, torch.full_like(t, 1.0)),
    "logit": torch.logit,
    "logit_eps": lambda t: torch.logit(t, eps=2.0 ** -10),  # 1 - eps exact in float32
    "special_logit": torch.special.logit,
    "entr": torch.special.entr,
    "sign": torch.sign,
    "sgn": torch.sgn,
    "signbit": lambda t: torch.signbit(t).float(),
    "copysign": lambda t: torch.copysign(torch.full_like(t, 1.5), t),
    "heaviside": lambda t: torch.heaviside(t, torch.full_like(t, 0.5)),
    "ldexp": lambda t: torch.ldexp(t, torch.ones_like(t).int() * 3),
    "positive": torch.positive,
    "special_round": torch.special.round,
    "nan_to_num": lambda t: torch.nan_to_num(t.float()),  # float32's largest
}


@pytest.mark.parametrize("name", COMPOSED)
def test_composed_functions_at_extreme_arguments(name, monkeypatch):
    """Each function as the kernels compute it, on float32 scores of magnitudes 1e-30 to 1e30 of both signs,
    0, +-1, +-(1 - 2^-k), -3.5 to 3.5 in steps of 0.01, the infinities and NaN: within 3 float32 ulps
    (relative; 1e-37 absolute, for results below float32's normal range) of the float64 value rounded to
    float32, and the same infinities and NaNs as torch (NaN from NaN but for sign, heaviside and nan_to_num;
    minimum and maximum propagate it). The branches for huge arguments (asinh and acosh past 1e18, hypot's
    scaling) and acosh below -1 (NaN, not -inf) are among them. (sigmoid and silu are not: exp2's argument
    x log2(e), rounded, puts |x| 2^-24 of relative error into e^-|x|, 25 ulps at x = -79; and the kernels'
    tanh keeps float32's absolute, not relative, precision below 1e-4.)"""
    function = COMPOSED[name]
    magnitudes = torch.logspace(-30, 30, 601, dtype=torch.float64).float()
    near_one = 1.0 - 2.0 ** -torch.arange(1.0, 25.0)
    x = torch.cat([magnitudes, -magnitudes, torch.tensor([0.0, -0.0, 1.0, -1.0, -3.0, math.inf, -math.inf, math.nan]),
                   torch.linspace(-3.5, 3.5, 701), near_one, -near_one])
    got = apply_score_fn(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: function(s)), x, monkeypatch)
    want = function(x.double()).float()
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[~finite], want[~finite], rtol=0, atol=0, equal_nan=True)
    error = (got[finite].double() - want[finite].double()).abs()
    wrong = ~(error <= 3 * 2**-23 * want[finite].double().abs() + 1e-37)  # a NaN error too
    assert not wrong.any(), f"at {x[finite][wrong][:4].tolist()}: {got[finite][wrong][:4].tolist()}"


@pytest.mark.parametrize("name", COMPOSED)
def test_composed_functions_derivatives_are_finite_where_torchs_are(name, monkeypatch):
    """Each function's derivative as the backward kernels compute it, at 0, +-1e-30, +-1e-3, +-0.5, +-2 and
    +-1e20 (the branches for tiny and huge arguments): finite wherever torch's float64 derivative is, and near
    it. A branch whose derivative is infinite where the other branch is taken (log(2|x|) at x = 0 for asinh)
    must not leak 0 * inf = NaN into the taken one."""
    function = COMPOSED[name]
    x = torch.tensor([0.0, 1e-30, 1e-3, 0.5, 2.0, 1e20])
    x = torch.cat([x, -x[1:]])
    exact = x.double().requires_grad_()
    value = function(exact)
    got = apply_score_fn(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: function(s)), x, monkeypatch,
                         derivative=True).double()
    if name in ("signbit", "heaviside"):  # steps: no derivative in torch (heaviside's raises); 0 in the kernels
        want = torch.zeros_like(got)
    else:
        want = torch.autograd.grad(value.sum(), exact)[0]
    finite = torch.isfinite(want) & torch.isfinite(value.detach())
    assert torch.isfinite(got[finite]).all(), f"at {x[finite][~torch.isfinite(got[finite])].tolist()}"
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)


GAUSSIAN_TAILS = {  # name: (the function, its exact value)
    "erfc": (torch.erfc, mpmath.erfc),
    "special_erfc": (torch.special.erfc, mpmath.erfc),
    "erfcx": (torch.special.erfcx, lambda x: mpmath.exp(x * x) * mpmath.erfc(x)),
    "ndtr": (torch.special.ndtr, mpmath.ncdf),
    "log_ndtr": (torch.special.log_ndtr,  # log1p above 0: Phi(x) is 1 - tiny, which 30 digits would round
                 lambda x: mpmath.log1p(-mpmath.ncdf(-x)) if x > 0 else mpmath.log(mpmath.ncdf(x))),
}


@pytest.mark.parametrize("name", GAUSSIAN_TAILS)
def test_gaussian_tail_functions_at_extreme_arguments(name, monkeypatch):
    """erfc, erfcx, ndtr and log_ndtr as the kernels compute them, on magnitudes 1e-30 to 1e30 of both signs,
    -20 to 20 in steps of 0.01, the infinities and NaN, against mpmath at 30 digits (torch's float64 ndtr,
    0.5 (1 + erf(x / sqrt 2)), has no digit left below -8): within 4 float32 ulps (1e-37 absolute below
    float32's normal range; the tail's t and two exponentials round five times), the same infinities and NaN.
    (log_ndtr's x^2 overflows past |x| = 1.8e19, to -inf; torch's float32 is finite to 2.6e19.)"""
    function, exact = GAUSSIAN_TAILS[name]
    magnitudes = torch.logspace(-30, 19 if name == "log_ndtr" else 30, 301, dtype=torch.float64).float()
    x = torch.cat([magnitudes, -magnitudes, torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan]),
                   torch.linspace(-20.0, 20.0, 4001)])
    got = apply_score_fn(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: function(s)), x, monkeypatch)
    mpmath.mp.dps = 30
    want = torch.tensor([float(exact(mpmath.mpf(float(v)))) if math.isfinite(v) else float(function(torch.tensor(v)))
                         for v in x.tolist()]).float()  # float() of a huge mpf is inf, as float32 rounds it
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[~finite], want[~finite], rtol=0, atol=0, equal_nan=True)
    error = (got[finite].double() - want[finite].double()).abs()
    wrong = ~(error <= 4 * 2**-23 * want[finite].double().abs() + 1e-37)
    assert not wrong.any(), f"at {x[finite][wrong][:4].tolist()}: {got[finite][wrong][:4].tolist()}"


def test_gaussian_soft_window_trains_its_width():
    """A soft window whose log weight falls as the Gaussian tail, s + log Phi((w - |q - kv|) / sigma_h): past
    the window log_ndtr is about -(d / sigma)^2 / 2 (here to -246), finite, where log(ndtr) would be -inf and
    its gradient NaN; sigma is learnable per head."""
    sigma = torch.tensor([1.5, 3.0], requires_grad=True)

    def score_mod(s, b, h, q_idx, kv_idx):
        return s + torch.special.log_ndtr((6.0 - torch.abs(q_idx - kv_idx)) / sigma[h])

    assert_matches_reference(ag.AttentionSpec(score_mod=score_mod), *Case(1, 2, 2, 33, 40, 16, 16).tensors())


SMALL_VALUE_MODS = {  # each about s (- 30): log(1 + x) or exp(x) - 1 would be off by up to 6e-3 or -inf
    "log1p": lambda s, b, h, q_idx, kv_idx: 1e5 * torch.log1p(1e-5 * s),
    "expm1": lambda s, b, h, q_idx, kv_idx: 1e5 * torch.expm1(1e-5 * s),
    "log_softplus": lambda s, b, h, q_idx, kv_idx: torch.log(torch.nn.functional.softplus(s - 30.0)),
    "sinh": lambda s, b, h, q_idx, kv_idx: 1e5 * torch.sinh(1e-5 * s),
    "asinh": lambda s, b, h, q_idx, kv_idx: 1e5 * torch.asinh(1e-5 * s),
    "atanh": lambda s, b, h, q_idx, kv_idx: 1e5 * torch.atanh(1e-5 * s),
    "acosh": lambda s, b, h, q_idx, kv_idx: 1e3 * torch.acosh(1.0 + 1e-6 * s * s),
    "tanhshrink": lambda s, b, h, q_idx, kv_idx: 1e6 * torch.nn.functional.tanhshrink(1e-2 * s),
}


@pytest.mark.parametrize("name", SMALL_VALUE_MODS)
def test_log1p_expm1_and_softplus_of_small_values_match_reference(name):
    """Mods that need log1p's and expm1's relative precision near 0 (softplus(x) is log1p(e^x) for x < 0; sinh,
    asinh, atanh near 0 and acosh near 1 are composed of them), and tanhshrink's series near 0."""
    spec = ag.AttentionSpec(score_mod=SMALL_VALUE_MODS[name], mask_mod=ag.masks.causal)
    assert_matches_reference(spec, *Case(1, 2, 2, 33, 33, 32, 32).tensors())


def _activations_and_rounding(s, b, h, q_idx, kv_idx):
    """torch.nn.functional's other activations, rounding, remainders, blends and tensor methods."""
    F = torch.nn.functional
    quarters = 0.25 * (q_idx - kv_idx).float()  # round's ties at every other half, both signs
    return (0.3 * F.elu(s) + 0.2 * F.celu(s, alpha=0.5) + 0.1 * F.selu(s) + 0.2 * F.leaky_relu(s, 0.1)
            + 0.1 * F.hardtanh(s, -0.5, 0.5) + 0.1 * F.relu6(3.0 * s) + 0.2 * F.hardsigmoid(2.0 * s)
            + 0.1 * F.hardswish(3.0 * s) + 0.2 * F.softsign(s) + 0.1 * F.mish(s) + 0.1 * torch.logaddexp(s, quarters)
            + 0.3 * torch.round(quarters) + 0.2 * quarters.round(decimals=1) + 0.1 * quarters.trunc()
            + 0.01 * torch.round(20.0 * quarters, decimals=-1)
            + 0.1 * torch.fmod(q_idx - kv_idx, 3) + 0.1 * torch.fmod(quarters, -1.5)
            + 0.1 * s.clamp_min(-0.5) + 0.1 * s.clamp_max(0.5) + 0.1 * torch.lerp(s, quarters, 0.3)
            + 0.05 * s.pow(2) + s.mul(0.2).add(0.1).sub(0.05).div(2.0) + 0.1 * s.where(q_idx >= kv_idx, -s)
            + 0.1 * s.masked_fill(kv_idx % 3 == 0, 0.5))


@pytest.mark.parametrize("case", [Case(1, 2, 2, 33, 33, 32, 32), Case(2, 2, 1, 17, 40, 16, 16)], ids=case_id)
def test_activations_rounding_and_methods_match_reference(case):
    """elu / celu / selu / leaky_relu / hardtanh / relu6 / hardsigmoid / hardswish / softsign / mish,
    logaddexp, round (half to even, also to decimals), trunc, fmod, clamp_min / clamp_max, lerp, and the
    method forms x.pow / mul / add / sub / div / where / masked_fill, against torch's, gradients too."""
    assert_matches_reference(ag.AttentionSpec(score_mod=_activations_and_rounding), *case.tensors())


def _hyperbolic_and_shrinking(s, b, h, q_idx, kv_idx):
    """Hyperbolic functions and their inverses (small arguments: SMALL_VALUE_MODS), atan, atan2, tan, asin, acos,
    shrinks, thresholds, xlogy, sinc, frac, angle units, heaviside, add / sub with alpha, hypot, float_power."""
    F = torch.nn.functional
    t = torch.tanh(s)  # in (-1, 1)
    return (0.1 * torch.sinh(s) + 0.1 * torch.cosh(0.5 * s) + 0.2 * torch.asinh(3.0 * s) + 0.2 * torch.arcsinh(s)
            + 0.1 * torch.acosh(1.0 + s * s) + 0.2 * torch.atanh(0.9 * t) + 0.2 * torch.arctanh(0.5 * t)
            + 0.2 * F.softshrink(s) + 0.2 * F.hardshrink(s, 0.3) + 0.2 * F.tanhshrink(s)
            + 0.2 * F.threshold(s, 0.2, -0.1)
            + 0.1 * torch.xlogy(torch.relu(s), 1.5 + t) + 0.1 * torch.xlogy(torch.relu(s), s)
            + 0.3 * torch.sinc(0.25 * (q_idx - kv_idx).float()) + 0.2 * torch.sinc(s) + 0.1 * torch.frac(2.0 * s)
            + 0.01 * torch.rad2deg(t) + torch.deg2rad(10.0 * s)
            + 0.1 * torch.heaviside((q_idx - kv_idx).float(), torch.tensor(0.5))
            + torch.add(0.5 * s, t, alpha=0.3) + s.sub(t, alpha=0.2) + torch.addcmul(s, t, t, value=0.1)
            + torch.addcdiv(s, t, 2.0 + t, value=-0.2) + 0.2 * torch.atan(2.0 * s) + 0.1 * torch.arctan(30.0 * t)
            + 0.1 * torch.tan(t) + 0.2 * torch.atan2(0.5 * s, t - 0.2) + 0.1 * torch.arctan2(t, s)
            + 0.3 * torch.atan2((q_idx % 5 - 2).float(), (kv_idx % 3 - 1).float())  # (0, 0), x = 0, both signs
            + 0.2 * torch.hypot(s, t + 0.5)
            + 0.1 * torch.hypot((q_idx % 3).float(), 1e30 * (kv_idx % 2).float()) * 1e-30
            + 0.1 * torch.float_power(s, 2) + 0.1 * torch.float_power(s.abs() + 1.0, t)
            + 0.2 * torch.asin(0.9 * t) + 0.1 * torch.arcsin(t * t) + 0.2 * torch.acos(0.8 * t)
            + 0.1 * torch.arccos(-t))


@pytest.mark.parametrize("case", [Case(1, 2, 2, 33, 33, 32, 32), Case(2, 2, 1, 17, 40, 16, 16)], ids=case_id)
def test_hyperbolic_functions_shrinks_and_friends_match_reference(case):
    """sinh / cosh / asinh / acosh / atanh, atan / atan2 / tan / asin / acos (and the arc- names), softshrink /
    hardshrink / tanhshrink / threshold, xlogy, sinc, frac, rad2deg / deg2rad, heaviside (of offsets: torch has
    no gradient), add / sub with alpha, addcmul / addcdiv, hypot (also past float32's square root of its
    largest value), float_power, against torch's, gradients too."""
    assert_matches_reference(ag.AttentionSpec(score_mod=_hyperbolic_and_shrinking), *case.tensors())


def _special_and_sign_functions(s, b, h, q_idx, kv_idx):
    t, p = torch.tanh(s), torch.sigmoid(s)
    offset = (kv_idx - q_idx).float()
    return (s + 0.3 * torch.logit(0.5 + 0.4 * t) + 0.2 * torch.logit(p, eps=0.1) + 0.3 * torch.special.entr(p)
            + 0.2 * torch.fmax(s, 0.5 * t) + 0.2 * torch.fmin(t, 0.1 * offset) + 0.2 * torch.logaddexp2(s, t)
            + 0.3 * torch.copysign(t, offset) + 0.1 * torch.ldexp(t, kv_idx % 3) + 0.2 * torch.special.xlog1py(p, t)
            + 0.2 * torch.special.expit(s) + 0.1 * torch.special.erf(s) + 0.1 * torch.signbit(s - 0.2).float()
            + 0.1 * torch.sgn(s) + torch.positive(0.1 * s) + 0.3 * torch.special.erfc(s) + 0.2 * torch.erfc(0.5 * s)
            + 0.2 * torch.special.erfcx(0.5 * s) + 0.3 * torch.special.ndtr(2.0 * s) + 0.1 * torch.special.log_ndtr(4.0 * s))


@pytest.mark.parametrize("case", [Case(1, 2, 2, 33, 33, 32, 32), Case(2, 2, 1, 17, 40, 16, 16)], ids=case_id)
def test_special_and_sign_functions_match_reference(case):
    """logit (with eps), torch.special's entr / xlog1py / expit / erf / erfc / erfcx / ndtr / log_ndtr (both sides
    of their branches at 1/2 and +-1/sqrt(2)), fmax / fmin, logaddexp2, copysign, signbit, sgn, ldexp, positive
    against torch's, gradients too."""
    assert_matches_reference(ag.AttentionSpec(score_mod=_special_and_sign_functions), *case.tensors())


def test_nan_and_infinity_tests_match_reference():
    """isnan / isinf / isposinf / isneginf / isfinite and nan_to_num on scores with NaN and infinities."""
    def score_mod(s, b, h, q_idx, kv_idx):
        odd = torch.where(kv_idx % 4 == 1, float("nan"), torch.where(kv_idx % 4 == 2, float("inf"), s))
        odd = torch.where(kv_idx % 8 == 3, float("-inf"), odd)
        flags = (0.1 * torch.isnan(odd).float() + 0.2 * torch.isinf(odd).float() + 0.3 * torch.isposinf(odd).float()
                 + 0.4 * torch.isneginf(odd).float() - 0.5 * torch.isfinite(odd).float() + 0.1 * torch.isnan(q_idx))
        return s + flags + 0.3 * torch.nan_to_num(odd, nan=0.5, posinf=2.0, neginf=-2.0)

    assert_matches_reference(ag.AttentionSpec(score_mod=score_mod), *Case(1, 2, 2, 30, 30, 16, 16).tensors())


def test_logaddexp_of_two_minus_infinities_is_minus_infinity():
    """Entries where both arguments are -inf are masked, as torch's -inf makes them, with finite gradients."""
    def score_mod(s, b, h, q_idx, kv_idx):
        dropped = kv_idx > q_idx + 2
        return torch.logaddexp(torch.where(dropped, -float("inf"), s), torch.where(dropped, -float("inf"), 0.5 * s))

    q, k, v = Case(1, 2, 2, 20, 20, 16, 16).tensors()
    assert_matches_reference(ag.AttentionSpec(score_mod=score_mod), q, k, v)
    ag.compile(ag.AttentionSpec(score_mod=score_mod))(q, k, v).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_fully_masked_rows_give_zero_output_and_minus_inf_lse():
    variant = next(v for v in VARIANTS if v.name == "empty_rows")
    case = Case(1, 2, 2, 20, 20, 16, 16)
    check_variant(variant, case)
    q, k, v, spec = variant_inputs(variant, case)
    out, stats = ag.compile(spec)(q, k, v, return_stats=True)
    assert torch.all(out[:, :, :3] == 0)
    assert torch.all(stats.lse[:, :, :3] == float("-inf"))
    assert torch.isfinite(stats.lse[:, :, 3:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_a_score_mod_sends_to_minus_inf_are_as_fully_masked_ones(dtype):
    """A score_mod that gives -inf to every key of a row (its mask keeps them): output 0, lse -inf, and
    gradients finite and as the reference's, through exp (float32) and exp2 (bfloat16) alike."""
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: torch.where(q_idx < 3, float("-inf"), s),
                            mask_mod=ag.masks.causal)
    case = Case(1, 2, 2, 40, 40, 16, 16, dtype=dtype, seed=1)
    out, stats = ag.compile(spec)(*case.tensors(), return_stats=True)
    assert torch.all(out[:, :, :3] == 0) and torch.all(stats.lse[:, :, :3] == float("-inf"))
    assert_matches_reference(spec, *case.tensors())


def test_everything_masked_has_finite_gradients():
    spec = ag.AttentionSpec(mask_mod=lambda b, h, q_idx, kv_idx: q_idx < 0)
    q, k, v = Case(1, 1, 1, 9, 9, 16, 16, seed=0).tensors()
    out, stats = ag.compile(spec)(q, k, v, return_stats=True)
    (out.sum() + torch.where(torch.isfinite(stats.lse), stats.lse, 0.0).sum()).backward()
    assert torch.all(out == 0) and torch.all(stats.lse == float("-inf"))
    for t in (q, k, v):
        assert torch.all(t.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["alibi", "relative_bias", "document"])
def test_half_precision_within_twice_the_torch_error(name, dtype):
    """FlashAttention's rule: error vs float64 <= 2 x the error of plain torch at that dtype."""
    variant = next(v for v in VARIANTS if v.name == name)
    q, k, v, spec = variant_inputs(variant, Case(2, 4, 2, 64, 70, 32, 32, dtype=dtype, seed=1))
    assert_matches_reference(spec, q, k, v)


def test_autocast_computes_in_its_dtype_as_sdpa_does():
    """Under torch.autocast, SDPA and FlexAttention compute in autocast's dtype whatever mix of dtypes q, k
    and v come in (a rotary embedding in float32 after a bfloat16 projection): attngen too, equal to the
    call on bfloat16 inputs, with gradients in each input's own dtype."""
    attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal, stats=("lse",)))
    q, k, v = Case(1, 4, 2, 33, 40, 16, 8, seed=3).tensors()
    k = k.detach().bfloat16().requires_grad_()
    halves = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, stats = attn(q, k, v, return_stats=True)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.float(), v, is_causal=True, enable_gqa=True)
    expected, expected_stats = attn(*halves, return_stats=True)
    assert out.dtype == sdpa.dtype == torch.bfloat16
    assert torch.equal(out, expected) and torch.equal(stats.lse, expected_stats.lse)
    (out.float().square().sum() + stats.lse.sum()).backward()
    (expected.float().square().sum() + expected_stats.lse.sum()).backward()
    for given, half in zip((q, k, v), halves):
        assert given.grad.dtype == given.dtype and torch.equal(given.grad, half.grad.to(given.dtype))


# learnable tensors read per head, per query and per key: their gradients are added up from per-row and
# per-key parts that the backward kernels write
PER_HEAD, PER_QUERY, PER_KEY = (torch.rand(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
                                for shape in ((4,), (2, 128), (2, 64)))
WRITTEN_WHOLE = {
    "learnable_captures": ag.AttentionSpec(
        score_mod=lambda s, b, h, q_idx, kv_idx: s * PER_HEAD[h] + PER_QUERY[b, q_idx] * PER_KEY[b, kv_idx],
        mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 3),
    "softmax": ag.AttentionSpec(mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 3,
                                stats=("lse", "max", "entropy")),
    "affine": ag.AttentionSpec(normalization=ag.norms.AffineSoftmax(alpha=0.8, beta=0.1)),
    "sigmoid": ag.AttentionSpec(normalization=ag.norms.Sigmoid(), mask_mod=ag.masks.causal),
    "sparsemax": ag.AttentionSpec(normalization=ag.norms.Sparsemax(), mask_mod=ag.masks.sliding_window(9)),
    "stick_breaking": ag.AttentionSpec(normalization=ag.norms.StickBreaking(), mask_mod=ag.masks.causal),
    "softpick": ag.AttentionSpec(normalization=ag.norms.Softpick(), mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 3),
    "signed_softmax": ag.AttentionSpec(normalization=ag.norms.SignedSoftmax(), mask_mod=ag.masks.causal),
    "normalized": ag.AttentionSpec(normalization=ag.norms.Normalized(lambda s: s * s),
                                   mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 3),
    "differential": ag.AttentionSpec(differential=0.5),
}


@pytest.mark.parametrize("case", [Case(1, 4, 2, 70, 33, 32, 16), Case(2, 2, 1, 0, 9, 16, 16),
                                  Case(1, 2, 2, 5, 0, 16, 16)], ids=case_id)
@pytest.mark.parametrize("name", sorted(WRITTEN_WHOLE))
def test_kernels_write_every_element_of_their_outputs(name, case):
    """The outputs, row statistics and dQ, dK, dV are allocated uninitialized, which these tests fill
    with NaN (conftest.py): in every family, with rows of no key, no queries or no keys, the kernels
    write them whole."""
    assert_matches_reference(WRITTEN_WHOLE[name], *case.tensors())


@pytest.mark.parametrize("name", sorted(WRITTEN_WHOLE))
def test_whole_tile_kernels_match_the_bounds_checked_ones(name, monkeypatch):
    """At lengths that are multiples of the tiles the kernels are built without bounds checks (EVEN_M,
    EVEN_N); forced to check them anyway, they give bit-identical outputs and gradients."""
    from attngen.runtime.loader import load_kernels
    attn = ag.compile(WRITTEN_WHOLE[name])
    q, k, v = Case(1, 4, 2, 128, 64, 16, 16, seed=2).tensors()
    grad_out = torch.randn(1, 4, 128, 16, generator=torch.Generator().manual_seed(0))
    results = []
    for checked in (False, True):
        if checked:
            monkeypatch.setattr(load_kernels(attn.path, interpret=True), "_fitted",
                                lambda config, LQ, LK: {**config, "EVEN_M": False, "EVEN_N": False})
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attn(*inputs)
        out.backward(grad_out)
        results.append([out, *(t.grad for t in inputs)])
    for whole, checked in zip(*results):
        assert torch.equal(whole, checked)


def test_learnable_captures_fill_only_their_gradients():
    """The captured tensors' gradients start at zero (the parts are added into them); each row's and each
    key's part, and the entry it adds to, are written whole by the kernels (6 fills more before)."""
    q, k, v = (t.requires_grad_() for t in Case(2, 4, 2, 70, 33, 16, 16).tensors())
    out = ag.compile(WRITTEN_WHOLE["learnable_captures"])(q, k, v)
    filled = fills(lambda: out.backward(torch.randn_like(out)))
    assert sum(filled.values()) == 3, filled


@pytest.mark.parametrize("normalization", [ag.norms.Softmax(), ag.norms.Sparsemax(), ag.norms.OffByOne()],
                         ids=["softmax", "sparsemax", "off_by_one"])
def test_backward_fills_no_memory_that_it_overwrites(normalization):
    """The gradients of unused statistics stay None and the residuals' (never differentiated) are not
    made: with nothing to accumulate, a backward fills no memory (each fill a kernel on the GPU; the
    sparsemax residuals' zeros were 7 per call)."""
    q, k, v = (t.requires_grad_() for t in Case(1, 2, 2, 40, 40, 16, 16).tensors())
    out = ag.compile(ag.AttentionSpec(normalization=normalization))(q, k, v)
    assert not fills(lambda: out.backward(torch.randn_like(out)))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_recomputes_the_same_gradients(reentrant):
    """torch.utils.checkpoint drops the forward's outputs and residuals and runs the forward again in the
    backward: the gradients (a learnable capture's too) are those of the plain call, dropout's mask
    included (its seed is drawn from torch's generator, whose state checkpoint restores to recompute)."""
    q, k, v = Case(1, 4, 2, 33, 40, 16, 16).tensors()
    slopes = torch.linspace(-0.5, 0.5, 4).requires_grad_()
    attn = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + slopes[h] * (kv_idx - q_idx),
                                       mask_mod=ag.masks.causal, dropout_p=0.25))
    grads = []
    for checkpointed in (False, True):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        slopes.grad = None
        torch.manual_seed(0)
        out = torch.utils.checkpoint.checkpoint(attn, *inputs, use_reentrant=reentrant) if checkpointed \
            else attn(*inputs)
        torch.rand(1)  # the generator moves on before the backward
        out.backward(torch.ones_like(out))
        grads.append([t.grad for t in inputs] + [slopes.grad])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal)),
                                  lambda: ag.compile(ag.LinearAttentionSpec())], ids=["attention", "linear"])
def test_a_second_derivative_is_refused(make):
    """The backward kernels' gradients are values torch cannot differentiate again: a backward that records a
    graph (create_graph=True, for a gradient penalty or a Hessian-vector product) is refused; the second
    derivative would otherwise lack attention's part (a gradient penalty's backward ran, without it)."""
    q = Case(1, 2, 2, 9, 9, 16, 16).tensors()[0].requires_grad_()
    attn = make()
    out = attn(q, q, q)
    with pytest.raises(RuntimeError, match=r"attngen computes first derivatives only.*create_graph=True"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    torch.autograd.grad(attn(q, q, q).sum(), q)  # a first derivative


def test_one_call_form_matches_compiled_spec():
    q, k, v = Case(1, 2, 2, 30, 30, 16, 16, seed=3).tensors()
    softcap = lambda s, b, h, q_idx, kv_idx: 5.0 * torch.tanh(s / 5.0)  # noqa: E731
    one_call = ag.attention(q, k, v, score_mod=softcap, mask_mod=ag.masks.causal)
    compiled = ag.compile(ag.AttentionSpec(score_mod=softcap, mask_mod=ag.masks.causal))(q, k, v)
    assert torch.equal(one_call, compiled)


def test_custom_scale_is_applied_before_score_mod():
    q, k, v = Case(1, 1, 1, 12, 12, 16, 16, seed=4).tensors()
    seen_scale = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s * 2.0, scale=0.25)
    same = ag.AttentionSpec(scale=0.5)
    torch.testing.assert_close(ag.compile(seen_scale)(q, k, v), ag.compile(same)(q, k, v), atol=1e-6, rtol=1e-5)


def test_captured_tensor_updates_in_place_are_seen():
    slopes = torch.zeros(2)
    attn = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx)))
    q, k, v = Case(1, 2, 2, 16, 16, 16, 16, seed=5).tensors()
    before = attn(q, k, v)
    slopes.fill_(1.0)
    after = attn(q, k, v)
    expected = ag.reference.attention(q, k, v, attn.spec)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)


def test_capture_that_starts_requiring_grad_gets_a_gradient():
    slopes = torch.rand(2)
    attn = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx)))
    q, k, v = Case(1, 2, 2, 16, 16, 16, 16, seed=6).tensors()
    attn(q, k, v)
    slopes.requires_grad_()
    attn(q, k, v).sum().backward()
    assert slopes.grad is not None and slopes.grad.abs().sum() > 0


def test_a_spec_per_call_over_new_tensors_reuses_the_compiled_module():
    """Data-dependent captures (the Forgetting Transformer's gates, computed by the model each step) are
    captured by a new spec per call: same IR, so the same module, and the gradient reaches the tensors
    the captured one was computed from."""
    q, k, v = Case(1, 2, 2, 24, 24, 16, 16, seed=7).tensors()
    paths, grads = set(), []
    for step in range(2):
        log_f = torch.nn.functional.logsigmoid(torch.randn(1, 2, 24) + 2).requires_grad_()
        decay = log_f.cumsum(-1)
        attn = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + decay[b, h, q_idx]
                                           - decay[b, h, kv_idx], mask_mod=ag.masks.causal))
        paths.add(attn.path)
        out = attn(q, k, v)
        torch.testing.assert_close(out, ag.reference.attention(q, k, v, attn.spec), atol=1e-5, rtol=1e-5)
        out.sum().backward()
        grads.append(log_f.grad)
    assert len(paths) == 1 and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", ["softmax", "differential", "stick_breaking"])
def test_learnable_captures_by_what_their_index_depends_on(family):
    """A captured tensor's gradient entry that is the same along a query row (indexed by the head, by
    the query) is summed per row in the dQ kernel, one indexed by the key alone per key in the dK/dV
    kernel, and torch adds the parts up (no atomics); one indexed by both (a relative position) is
    added atomically, and only it is named as an atomic sum (stick-breaking, with no dK/dV kernel,
    adds the key-indexed one atomically too). Each against the float64 reference, with GQA,
    Lq != Lk, odd lengths and rows that keep no key."""
    from attngen.runtime.loader import load_kernels
    gen = torch.Generator().manual_seed(0)
    per_head = torch.rand(4, generator=gen).requires_grad_()  # capture 0, read at [h]
    per_query = (0.5 + torch.rand(2, 37, generator=gen)).requires_grad_()  # capture 1, at [b, q_idx]
    per_key = torch.rand(2, 41, generator=gen).requires_grad_()  # capture 2, at [b, kv_idx]
    relative = torch.rand(4, 80, generator=gen).requires_grad_()  # capture 3, at [h, q_idx - kv_idx + 40]

    def score(s, b, h, q_idx, kv_idx):
        return s * (0.5 + per_head[h]) * per_query[b, q_idx] + per_key[b, kv_idx] + relative[h, q_idx - kv_idx + 40]

    options = {"differential": {"differential": 0.5},
               "stick_breaking": {"normalization": ag.norms.StickBreaking()}}.get(family, {})
    spec = ag.AttentionSpec(score_mod=score, mask_mod=lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx + 4) & (q_idx >= 3),
                            **options)
    assert_matches_reference(spec, *Case(2, 4, 2, 37, 41, 16, 8).tensors())
    kernels = load_kernels(ag.compile(spec).path, interpret=True)
    assert set(kernels.ROW_GRADIENT_CAPTURES) == {0, 1}
    stick = family == "stick_breaking"
    assert set(kernels.KEY_GRADIENT_CAPTURES) == (set() if stick else {2})
    assert kernels.BACKWARD_ATOMIC_SUMS == [f"the gradient of captured tensor #{i}" for i in ((2, 3) if stick else (3,))] \
        + (["the gradient of k", "the gradient of v"] if stick else [])
