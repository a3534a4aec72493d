"""torch functions that traced mods call, composed of the IR's own ops.

Each function runs on the tracer's proxies: the torch calls inside it record IR nodes (through
``Proxy.__torch_function__``), so the kernels and the autodiff pass see only the IR's ops. Where torch
defines a value at a tie or a boundary (``round`` to even, ``leaky_relu`` at 0), the composition does
too; gradients follow from the IR's rules.
"""

from __future__ import annotations

import math

import torch

_LN2, _LN10 = math.log(2.0), math.log(10.0)
_SELU_SCALE, _SELU_ALPHA = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717


def _sign(x):
    if x.tracer.dtype(x) == "float":
        return torch.where(x > 0, 1.0, torch.where(x < 0, -1.0, 0.0))
    return torch.where(x > 0, 1, torch.where(x < 0, -1, 0))


def _magnitude(x, slope_at_zero=1.0):
    """|x| as ``where``, whose derivative at 0 is ``slope_at_zero`` (torch's abs' is 0 there): a smooth function
    written with |x| (asinh, softplus) then keeps its derivative at 0."""
    return torch.where(x < 0, -x, x) if slope_at_zero > 0 else torch.where(x > 0, x, -x)


def _softplus(x, beta=1.0, threshold=20.0):
    """torch's softplus as max(bx, 0) + log1p(exp(-|bx|)), over beta: no exp overflows, so neither
    branch of the gradient is inf (torch returns x itself past ``threshold``; this is within 2e-9 of it)."""
    bx = x * beta
    return (torch.clamp(bx, min=0.0) + torch.log1p(torch.exp(-_magnitude(bx)))) / beta


def _log_sigmoid(x):
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-_magnitude(x, slope_at_zero=-1.0)))


def _gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _round(x, decimals=0):
    """Half to even, as torch rounds: floor(x), one up where the rest is above one half or exactly one
    half with an odd floor (x - floor(x) is exact in float32 but on (-0.5, 0), where it only rounds
    up, to at most 1, which rounds the same way)."""
    if x.tracer.dtype(x) != "float":
        return x
    if decimals > 0:  # as torch: the scaled value rounded, divided back (multiplied for negative decimals)
        return _round(x * 10.0 ** decimals) / 10.0 ** decimals
    if decimals < 0:
        return _round(x / 10.0 ** -decimals) * 10.0 ** -decimals
    down = torch.floor(x)
    rest = x - down
    up = (rest > 0.5) | ((rest == 0.5) & (down % 2.0 != 0.0))
    return down + torch.where(up, 1.0, 0.0)


def _trunc(x):
    return torch.where(x < 0, torch.ceil(x), torch.floor(x)) if x.tracer.dtype(x) == "float" else x


def _fmod(a, b):
    """C's remainder (the sign of ``a``) from the floor remainder (the sign of ``b``)."""
    rest = torch.remainder(a, b)
    return torch.where((rest != 0) & ((rest < 0) != (a < 0)), rest - b, rest)


def _log_add(a, b, ln_base=1.0):
    """log(base^a + base^b) as max + log1p(base^-|a - b|); where the larger is infinite, itself (a - b would
    be NaN at two equal). logaddexp, and logaddexp2 with ln_base = ln 2."""
    larger = torch.maximum(a, b)
    rest = torch.log1p(torch.exp(-torch.abs(a - b) * ln_base)) / ln_base
    return torch.where(torch.abs(larger) == math.inf, larger, larger + rest)


def _signbit(x):
    """x < 0, and -0.0 (1 / -0.0 is -inf); a NaN counts as positive (its sign bit is not traced)."""
    return (x < 0) | ((x == 0) & (1.0 / torch.where(x == 0, x, 1.0) < 0))


def _fmax(a, b):
    """The larger, the other where one is NaN; ties give a the gradient (torch.fmax's)."""
    return torch.where(_is_nan(b) | (a >= b), a, b)


def _fmin(a, b):
    """The smaller, as _fmax."""
    return torch.where(_is_nan(b) | (a <= b), a, b)


def _logit(x, eps=None):
    """log(x / (1 - x)), x clamped to [eps, 1 - eps] first when eps is given (torch.logit's); from 1/4 up
    as log1p((2x - 1) / (1 - x)), whose numerator is exact: precise near 1/2, where the log of the
    rounded quotient is not (nor torch's float32)."""
    if eps is not None:
        x = torch.clamp(x, eps, 1.0 - eps)
    return torch.where(x < 0.25, torch.log(x / (1.0 - x)), torch.log1p((2.0 * x - 1.0) / (1.0 - x)))


def _entr(x):
    """-x log(x); 0 at 0, -inf below, as torch (gradient 0 at 0 and below, where torch's is inf and NaN)."""
    return torch.where(x < 0, -math.inf, torch.where(x == 0, 0.0, -x * torch.log(torch.where(x > 0, x, 1.0))))


def _elu(x, alpha=1.0):
    return torch.where(x > 0, x, alpha * torch.expm1(x))


def _hardtanh(x, min_val=-1.0, max_val=1.0):
    """The bound itself at the bounds, so the gradient there is 0, as torch's (clamp's would be 1)."""
    return torch.where(x <= min_val, min_val, torch.where(x >= max_val, max_val, x))


def _hardsigmoid(x):
    return _hardtanh(x / 6.0 + 0.5, 0.0, 1.0)


def _log_of_twice(x):
    """log(2x), which asinh(x) and acosh(x) are to float32's precision past 1e18 (where x^2 overflows)."""
    return torch.log(x) + _LN2


def _asinh(x):
    """sign(x) log1p(|x| + x^2 / (1 + sqrt(1 + x^2))), which keeps float32's precision near 0; log(2|x|)
    past 1e18, where x^2 would overflow."""
    a = _magnitude(x)
    magnitude = torch.where(a > 1e18, _log_of_twice(a), torch.log1p(a + a * a / (1.0 + torch.sqrt(1.0 + a * a))))
    return torch.where(x < 0, -magnitude, magnitude)


def _acosh(x):
    """log1p((x - 1) + sqrt((x - 1)(x + 1))): precise near 1; NaN below 1, as torch (below -1 the root is
    real and the formula would give -inf)."""
    value = torch.where(x > 1e18, _log_of_twice(x), torch.log1p((x - 1.0) + torch.sqrt((x - 1.0) * (x + 1.0))))
    return torch.where(x < 1.0, math.nan, value)


def _atanh(x):
    """sign(x) log1p(2|x| / (1 - |x|)) / 2: precise near 0 and (log1p of a positive number) near -1; inf at
    1, NaN past it, as torch."""
    a = _magnitude(x)
    magnitude = 0.5 * torch.log1p(2.0 * a / (1.0 - a))
    return torch.where(x < 0, -magnitude, magnitude)


def _atan2(y, x):
    """One atan, of the smaller over the larger of |y| and |x| (no inf or NaN; torch's gradient everywhere
    but at (0, 0)): atan(y / x), a half turn of y's sign (-0.0's too) added where x < 0, if |x| >= |y|
    (0 at (0, 0)); pi/2 sign(y) - atan(x / y) if |y| > |x|."""
    steep = torch.abs(y) > torch.abs(x)
    angle = torch.atan(torch.where(steep, x, y) / torch.where(steep, y, torch.where(x == 0, 1.0, x)))
    turn = torch.where(steep, torch.where(y < 0, -0.5 * math.pi, 0.5 * math.pi),
                       torch.where(x < 0, torch.where(_signbit(y), -math.pi, math.pi), 0.0))
    return turn + torch.where(steep, -angle, angle)


def _root_of_one_minus_square(x):
    """sqrt((1 - x)(1 + x)): no cancellation near +-1 (1 - x is exact there); NaN past them."""
    return torch.sqrt((1.0 - x) * (1.0 + x))


def _asin(x):
    return _atan2(x, _root_of_one_minus_square(x))


def _acos(x):
    return _atan2(_root_of_one_minus_square(x), x)


def _hypot(a, b):
    """sqrt(a^2 + b^2) as the larger magnitude times sqrt(1 + r^2), r the smaller over it: no square
    overflows or underflows (as torch's); 0 at (0, 0); inf where either is infinite, even with a NaN (C's
    hypot, torch's)."""
    a, b = torch.abs(a), torch.abs(b)
    larger, smaller = torch.maximum(a, b), torch.minimum(a, b)
    ratio = smaller / torch.where(larger == 0, 1.0, larger)
    return torch.where((a == math.inf) | (b == math.inf), math.inf, larger * torch.sqrt(1.0 + ratio * ratio))


def _sinc(x):
    """sin(pi x) / (pi x), 1 at 0 (gradient 0 there, as torch's: the quotient's divisor is 1 where not taken)."""
    zero = x == 0
    return torch.where(zero, 1.0, torch.sin(math.pi * x) / (math.pi * torch.where(zero, 1.0, x)))


def _tanhshrink(x):
    """x - tanh(x), which cancels near 0 (in torch's float32 too: 0 or either sign for |x| < 1e-3); below
    |x| = 0.2 its series x^3/3 - 2x^5/15 + 17x^7/315 - 62x^9/2835, to float32's relative precision."""
    z = x * x
    series = x * z * (((-62.0 / 2835.0 * z + 17.0 / 315.0) * z - 2.0 / 15.0) * z + 1.0 / 3.0)
    return torch.where(torch.abs(x) < 0.2, series, x - torch.tanh(x))


def _is_nan(x):
    return x != x if x.tracer.dtype(x) == "float" else torch.zeros_like(x, dtype=torch.bool)


def _nan_to_num(x, nan=0.0, posinf=None, neginf=None):
    """NaN, inf and -inf replaced; the infinities by float32's largest finite values unless given (a traced
    value is float32, as in the kernels)."""
    big = torch.finfo(torch.float32).max
    posinf, neginf = big if posinf is None else posinf, -big if neginf is None else neginf
    return torch.where(_is_nan(x), nan, torch.where(x == math.inf, posinf, torch.where(x == -math.inf, neginf, x)))


def _xlogy(x, y, log=torch.log):
    """x log(y), 0 where x is 0 (unless y is NaN), as torch, and so its derivative in x, log(y) (0 where that
    is not finite); xlog1py with log = log1p."""
    logarithm = log(y)
    return x * torch.where((x == 0) & ~_is_nan(y) & ~(torch.abs(logarithm) < math.inf), 0.0, logarithm)


# log(erfc(z)) + z^2 - log(t) for z >= 1/2, t = 1 / (1 + z / 2) in (0, 4/5]: a polynomial in t, highest power
# first (a degree-10 Chebyshev least-squares fit to mpmath's erfc at 40 digits, converted to powers of t;
# within 9e-9 on [0, 4/5], t = 0 being the limit z -> inf)
_ERFC_TAIL = (0.2254718555, -0.794912924, 0.939786148, -0.2945824024, -0.04284815455, -0.1359039074,
              -0.09030394397, 0.08401683074, 0.3749546238, 1.000001076, -1.265512127)
_SQRT_HALF = math.sqrt(0.5)


def _split_square(x):
    """x^2 as hi + lo for 0 <= x <= 16, hi exact in float32 (x to 1/256 has at most 12 significant bits), so
    that exp(-x^2) keeps float32's relative precision where x^2 is large (it would lose x^2 2^-24)."""
    high = torch.floor(x * 256.0) / 256.0
    return high * high, (x - high) * (x + high)


def _erfc_tail_log(z):
    """(t, log(erfc(z)) + z^2 - log(t)) for z >= 1/2, t = 1 / (1 + z / 2), by _ERFC_TAIL."""
    t = 1.0 / (1.0 + 0.5 * z)
    p = 0.0
    for c in _ERFC_TAIL:
        p = p * t + c
    return t, p


def _erfc_tail(z, hi, lo):
    """erfc(z) for z in [1/2, 16] given z^2 = hi + lo (hi exact): t exp(-hi) exp(tail - lo), no cancellation."""
    t, tail = _erfc_tail_log(z)
    return t * torch.exp(-hi) * torch.exp(tail - lo)


def _erfc(x):
    """1 - erf(x) below 1/2, where it is at least 0.48; the tail's formula above (0 from 16 on, as float32's)."""
    z = torch.clamp(x, 0.5, 16.0)
    return torch.where(x < 0.5, 1.0 - torch.erf(x), _erfc_tail(z, *_split_square(z)))


def _erfcx(x):
    """exp(x^2) erfc(x): the tail's t exp(tail) above 1/2; below, exp(x^2) of the split square (inf from -9.5 on,
    as float32's from -9.4) times 1 - erf(x)."""
    t, tail = _erfc_tail_log(torch.clamp(x, min=0.5))
    below = torch.clamp(x, -9.5, 0.5)  # each branch finite where the other is taken (else its gradient is NaN)
    hi, lo = _split_square(torch.abs(below))
    return torch.where(x < 0.5, torch.exp(hi) * torch.exp(lo) * (1.0 - torch.erf(x)), t * torch.exp(tail))


def _normal_tail(a):
    """The standard normal's upper tail 1 - Phi(a) = erfc(a / sqrt 2) / 2 for a >= 1 / sqrt 2, with a^2 / 2 split
    from a's own square (exact halves): sqrt(1/2)'s rounding would cost (a^2 / 2) 2^-24."""
    a = torch.clamp(a, _SQRT_HALF, 16.0)
    hi, lo = _split_square(a)
    return 0.5 * _erfc_tail(a * _SQRT_HALF, 0.5 * hi, 0.5 * lo)


def _ndtr(x):
    return torch.where(x > -_SQRT_HALF, 0.5 + 0.5 * torch.erf(x * _SQRT_HALF), _normal_tail(-x))


def _log_ndtr(x):
    """log Phi(x): log1p of minus the upper tail above 1 / sqrt 2, log of Phi around 0, and below -1 / sqrt 2
    the tail's log itself, log(t / 2) - x^2 / 2 + tail(t), which no exponential underflows."""
    t, tail = _erfc_tail_log(_SQRT_HALF * torch.clamp(-x, min=_SQRT_HALF))
    lower = torch.log(0.5 * t) - 0.5 * (x * x) + tail  # -inf past |x| = 1.8e19, where x^2 overflows
    middle = torch.log(0.5 + 0.5 * torch.erf(torch.clamp(x, -_SQRT_HALF, _SQRT_HALF) * _SQRT_HALF))  # finite
    return torch.where(x <= -_SQRT_HALF, lower,
                       torch.where(x < _SQRT_HALF, middle, torch.log1p(-_normal_tail(x))))


# torch function name -> its composition (aliases share one)
COMPOSITE = {
    "square": lambda x: x * x,
    "reciprocal": lambda x: 1.0 / x,
    "rsqrt": lambda x: 1.0 / torch.sqrt(x),
    "exp2": lambda x: torch.exp(x * _LN2),
    "log2": lambda x: torch.log(x) / _LN2,
    "log10": lambda x: torch.log(x) / _LN10,
    "sign": _sign,
    "round": _round,
    "trunc": _trunc,
    "fix": _trunc,
    "fmod": _fmod,
    "clamp_min": lambda x, min: torch.clamp(x, min=min),
    "clamp_max": lambda x, max: torch.clamp(x, max=max),
    "lerp": lambda start, end, weight: start + weight * (end - start),
    "logaddexp": _log_add,
    "logaddexp2": lambda a, b: _log_add(a, b, _LN2),
    "fmax": _fmax,
    "fmin": _fmin,
    "signbit": _signbit,
    "copysign": lambda a, b: torch.where(_signbit(b), -torch.abs(a), torch.abs(a)),
    "ldexp": lambda x, e: x * torch.exp2(e.float()),
    "sgn": _sign,
    "positive": lambda x: x,
    "expit": torch.sigmoid,
    "logit": _logit,
    "entr": _entr,
    "erfc": _erfc,
    "erfcx": _erfcx,
    "ndtr": _ndtr,
    "log_ndtr": _log_ndtr,
    "silu": lambda x: x * torch.sigmoid(x),
    "log_sigmoid": _log_sigmoid,
    "logsigmoid": _log_sigmoid,
    "softplus": _softplus,
    "gelu": _gelu,
    "elu": _elu,
    "celu": lambda x, alpha=1.0: torch.where(x > 0, x, alpha * torch.expm1(x / alpha)),
    "selu": lambda x: _SELU_SCALE * _elu(x, _SELU_ALPHA),
    "leaky_relu": lambda x, negative_slope=0.01: torch.where(x > 0, x, x * negative_slope),
    "hardtanh": _hardtanh,
    "relu6": lambda x: _hardtanh(x, 0.0, 6.0),
    "hardsigmoid": _hardsigmoid,
    "hardswish": lambda x: x * _hardsigmoid(x),
    "softsign": lambda x: x / (1.0 + torch.abs(x)),
    "mish": lambda x: x * torch.tanh(_softplus(x)),
    # A NaN fails each comparison of the shrinks and threshold and falls through to an expression of x, as in torch.
    "softshrink": lambda x, lambd=0.5: torch.where(x > lambd, x - lambd, torch.where(x >= -lambd, 0.0, x + lambd)),
    "hardshrink": lambda x, lambd=0.5: torch.where(torch.abs(x) <= lambd, 0.0, x),
    "tanhshrink": _tanhshrink,
    "threshold": lambda x, threshold, value: torch.where(x <= threshold, value, x),
    "sinh": lambda x: 0.5 * (torch.expm1(x) - torch.expm1(-x)),  # precise near 0
    "cosh": lambda x: 0.5 * (torch.exp(x) + torch.exp(-x)),
    "asinh": _asinh,
    "arcsinh": _asinh,
    "acosh": _acosh,
    "arccosh": _acosh,
    "atanh": _atanh,
    "arctanh": _atanh,
    "sinc": _sinc,
    "tan": lambda x: torch.sin(x) / torch.cos(x),
    "asin": _asin,
    "arcsin": _asin,
    "acos": _acos,
    "arccos": _acos,
    "atan2": _atan2,
    "arctan2": _atan2,
    "hypot": _hypot,
    "float_power": lambda x, exponent: torch.pow(x, exponent),  # in the kernels' float32, as every traced value
    "frac": lambda x: x - _trunc(x),
    "rad2deg": lambda x: x * (180.0 / math.pi),
    "deg2rad": lambda x: x * (math.pi / 180.0),
    "isnan": _is_nan,
    "isinf": lambda x: torch.abs(x) == math.inf,
    "isposinf": lambda x: x == math.inf,
    "isneginf": lambda x: x == -math.inf,
    "isfinite": lambda x: torch.abs(x) < math.inf,  # NaN is not
    "nan_to_num": _nan_to_num,
    "xlogy": _xlogy,
    "xlog1py": lambda x, y: _xlogy(x, y, torch.log1p),
    "heaviside": lambda x, values: torch.where(x == 0, values, torch.where(x > 0, 1.0, 0.0)),
    "addcmul": lambda x, a, b, value=1.0: x + value * a * b,
    "addcdiv": lambda x, a, b, value=1.0: x + value * a / b,
}
