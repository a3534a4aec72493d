"""The normalization family: how a row of modded scores becomes weights.

Seven families share the kernel templates:

* ``"softmax"`` -- online row normalizers: ``p_j = exp(l_j) / (exp(sink) + sum_k exp(l_k))``
  over the kept keys, where the logits ``l = logits(score, h, n)`` are a traced
  function of the score (identity for plain softmax). Optional affine output
  ``alpha * softmax + beta``. Row statistics (``lse``) are defined.
* ``"rectified"`` -- softpick: ``p_j = relu(exp(l_j) - 1) / (sum_k |exp(l_k) - 1| + eps)``,
  run as the online softmax with its running max starting at 0 (no statistics).
* ``"signed"`` -- Cog attention's signed softmax: ``p_j = sign(l_j) exp(|l_j|) / sum_k exp(|l_k|)``,
  the online softmax of ``|l|`` with the sign put back on the weights (no statistics).
* ``"elementwise"`` -- no row state: ``p_j = weight(score_j, h, n)``; masked
  keys get weight 0. The backward uses the IR derivative of ``weight``.
* ``"normalized"`` -- elementwise weights divided by their row sum:
  ``p_j = weight(score_j, h, n) / (sum_k weight(score_k, h, n) + eps)``.
* ``"stick_breaking"`` -- each kept key takes ``sigmoid(l_j)`` of the stick left by
  the keys after it: ``p_j = sigmoid(l_j) * prod_{k > j} (1 - sigmoid(l_k))``.
* ``"threshold"`` -- sparse row normalizers (sparsemax, alpha-entmax):
  ``p_j = [(alpha - 1) l_j - tau]_+ ** (1 / (alpha - 1))`` with the row's
  threshold ``tau`` found by safeguarded Newton passes over the keys, so that
  the weights sum to 1 with exact zeros.

``n`` is the number of keys (``count="length"``) or, per row, the number of
kept keys (``count="unmasked"``). Per-head parameters are floats or tensors of
shape ``[Hq]``; tensors that require grad receive gradients.

A new normalization is a subclass overriding ``logits`` or ``weight`` (both
are traced like a score_mod, so they may use ``torch`` functions and index
captured tensors by ``h``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .scalars import integer, real

COUNTS = ("length", "unmasked")
# the families whose kernels run an online softmax: softmax itself, softpick ("rectified"), whose terms
# exp(l - m) - exp(-m) rescale with the running max m as exp(l - m) does, and the signed softmax of |l|
ONLINE_FAMILIES = ("softmax", "rectified", "signed")
# the families that weigh each key by ``weight`` (else by a row normalizer of ``logits``)
WEIGHT_FAMILIES = ("elementwise", "normalized")


def _check_parameter(name: str, value, allow=()):
    """``value`` (a finite number, a float tensor of shape [heads] or [], or a string of ``allow``), with
    a number as a Python one."""
    if isinstance(value, str) and value in allow:
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a per-head tensor, got a bool")
    if real(value) is not None:
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        return real(value)
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dim() > 1:
            raise TypeError(f"{name} must be a float or a floating-point tensor of shape [heads], "
                            f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
        return value
    raise TypeError(f"{name} must be a float or a per-head tensor, got {type(value).__name__}")


def _check_eps(name: str, eps) -> float:
    """``eps`` as a float, which must be positive and finite."""
    if real(eps) is None or not 0 < eps < math.inf:
        raise ValueError(f"{name} must be a positive float, got {eps!r}")
    return float(eps)


def per_head(value, h):
    """``value[h]`` for a per-head tensor, the value itself for a float or a 0-d tensor."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value[h]
    return value


def _check_count(count: str) -> None:
    if count not in COUNTS:
        raise ValueError(f"count must be one of {COUNTS}, got {count!r}")


class Normalization:
    """Base class of everything accepted as ``AttentionSpec(normalization=...)``."""

    family = "softmax"
    count = "length"
    sink = None
    affine = None  # (alpha, beta) for an affine softmax
    exact_zeros = False  # whether kept keys can weigh exactly 0 (the "support" statistic counts the others)

    @property
    def learnable_sink(self) -> bool:
        """Whether the sink is a tensor that receives a gradient (``requires_grad``)."""
        return isinstance(self.sink, torch.Tensor) and self.sink.requires_grad

    def logits(self, score, h, n):
        """Softmax family: the logits the softmax is taken over."""
        return score

    def weight(self, score, h, n):
        """Elementwise and normalized families: the weight of one kept key."""
        raise NotImplementedError(f"{type(self).__name__} does not define weight()")

    def drops_minus_inf(self) -> bool:
        """Whether a key whose logit is -inf (as FlexAttention's score_mods drop one) weighs 0: for every
        normalization of logits, and for the weight families whose weight vanishes there (sigmoid, ReLU; not
        ``Normalized(lambda s: s ** 2)``)."""
        if self.family not in WEIGHT_FAMILIES:
            return True
        with torch.no_grad():  # 0-d CPU tensors, which combine with parameters on any device
            weight = self.weight(torch.tensor(-math.inf), torch.tensor(0), torch.tensor(1.0))
        return bool(torch.as_tensor(weight == 0).all())

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={_show(v)}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _show(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    return getattr(value, "__name__", None) or repr(value)


class Softmax(Normalization):
    """``p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k))``; ``sink=None`` is plain softmax.

    ``sink`` is a float (``0.0``: the off-by-one "softmax1") or a per-head
    tensor, learnable with ``requires_grad`` ("attention sinks"). With a sink,
    ``lse`` includes it: ``lse = log(exp(sink) + sum_k exp(s_k))``.
    """

    def __init__(self, sink=None):
        self.sink = None if sink is None else _check_parameter("Softmax(sink=...)", sink)


def OffByOne() -> Softmax:  # noqa: N802 - reads like the class it stands for
    """Softmax with a fixed zero sink: ``exp(s_j) / (1 + sum_k exp(s_k))`` (softmax1)."""
    return Softmax(sink=0.0)


class ScalableSoftmax(Normalization):
    """Softmax of ``s * scale * log(n)`` (scalable softmax); ``scale`` float or per-head tensor."""

    def __init__(self, s=1.0, count: str = "length"):
        _check_count(count)
        self.s, self.count = _check_parameter("ScalableSoftmax(s=...)", s), count

    def logits(self, score, h, n):
        # log(n) at least float32's smallest normal, 2^-126: with one key a score of -inf (a key score_mod drops)
        # stays -inf, not 0 * inf = NaN, and a finite one's logit is within 1e-37 of 0 (a per-row clamp, free);
        # such a key passes a learnable s no gradient (not 0 * inf either): the selects fold away where
        # score_mod keeps scores finite
        scale = per_head(self.s, h) * torch.clamp(torch.log(n), min=2.0 ** -126)
        live = score != float("-inf")
        return torch.where(live, torch.where(live, score, 0.0) * scale, score)


class AffineSoftmax(Normalization):
    """``p = alpha * softmax(s) + beta`` over the kept keys; alpha, beta float or per-head tensors."""

    def __init__(self, alpha=1.0, beta=0.0):
        self.affine = (_check_parameter("AffineSoftmax(alpha=...)", alpha),
                       _check_parameter("AffineSoftmax(beta=...)", beta))


class Sigmoid(Normalization):
    """``p_j = sigmoid(s_j + bias)``; bias float, per-head tensor, or ``"-log n"``."""

    family = "elementwise"

    def __init__(self, bias=0.0, count: str = "length"):
        _check_count(count)
        self.bias, self.count = _check_parameter("Sigmoid(bias=...)", bias, allow=("-log n",)), count

    def weight(self, score, h, n):
        bias = -torch.log(n) if isinstance(self.bias, str) else per_head(self.bias, h)
        return torch.sigmoid(score + bias)


class ReLU(Normalization):
    """``p_j = relu(s_j) ** power / n``, ``n`` the key length or the kept count per row."""

    family = "elementwise"
    exact_zeros = True

    def __init__(self, power: int = 1, normalize: str = "length"):
        if integer(power) not in (1, 2, 3):
            raise ValueError(f"ReLU(power=...) must be 1, 2 or 3, got {power!r}")
        _check_count(normalize)
        self.power, self.count = integer(power), normalize

    def weight(self, score, h, n):
        return torch.clamp(score, min=0.0) ** self.power / n


class Elementwise(Normalization):
    """``p_j = fn(s_j)`` for any traceable ``fn`` (e.g. ``lambda s: torch.sigmoid(s) ** 2``)."""

    family = "elementwise"

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"Elementwise(fn) needs a function of the score, got {type(fn).__name__}")
        self.fn = fn

    def weight(self, score, h, n):
        return self.fn(score)


class SignedSoftmax(Normalization):
    """The signed softmax of Cog attention (Lv et al. 2024): ``p_j = sign(l_j) exp(|l_j|) / sum_k exp(|l_k|)``
    over the kept keys whose logit is not -inf (a score_mod's -inf drops a key, as a mask does). Weights
    are negative where the logit is: a key can be subtracted from the output, and how much it weighs
    grows with the logit's magnitude either way. No statistics."""

    family = "signed"


def _check_nonnegative(fn: Callable) -> None:
    """Raise if ``fn`` is negative at a score from -1e4 to 1e4 (tried on a grid): a row sum of such weights
    can vanish or change sign, and dividing by it is not a normalization."""
    scores = torch.cat([torch.linspace(-30.0, 30.0, 2401, dtype=torch.float64),
                        torch.tensor([-1e4, -1e3, -100.0, 100.0, 1e3, 1e4], dtype=torch.float64)])
    weights = torch.as_tensor(fn(scores), dtype=torch.float64)
    negative = torch.nonzero(weights < 0).flatten()
    if len(negative):
        at = scores[negative[0]].item()
        raise ValueError(f"Normalized(fn) needs fn(s) >= 0 for every score s (its weights are divided by their "
                         f"row sum), but fn({at:g}) = {weights[negative[0]].item():g}")


class Normalized(Normalization):
    """``p_j = fn(s_j) / (sum_k fn(s_k) + eps)`` over the kept keys, for a traceable ``fn`` that is >= 0:
    attention with a kernel of the scores in place of exp, e.g. ``lambda s: torch.clamp(s, min=0) ** 2``,
    the even powers ``s ** 2`` / ``s ** 4`` of polynomial attention, ``torch.sigmoid``. A row whose weights sum
    to 0 (or that keeps no key) gives 0. The backward uses the IR derivative of ``fn``."""

    family = "normalized"

    def __init__(self, fn: Callable, eps: float = 1e-6):
        if not callable(fn):
            raise TypeError(f"Normalized(fn) needs a function of the score, got {type(fn).__name__}")
        eps = _check_eps("Normalized(eps=...)", eps)
        _check_nonnegative(fn)
        self.fn, self.eps = fn, eps

    def weight(self, score, h, n):
        return self.fn(score)


class Entmax(Normalization):
    """alpha-entmax (Peters et al. 2019): ``p_j = [(alpha - 1) l_j - tau]_+ ** (1 / (alpha - 1))`` with
    ``tau`` per row such that ``sum_j p_j = 1``; keys below the threshold get exactly 0.

    ``alpha`` in (1, 2]: 2 is sparsemax, 1.5 the usual entmax, toward 1 softmax; a float, or a
    tensor of shape ``[Hq]`` with one ``alpha`` per head, learnable with ``requires_grad`` (adaptively
    sparse attention, Correia et al. 2019: each head learns how sparse it is; keep it in (1, 2], e.g.
    ``1 + torch.sigmoid(a)``: a CPU call checks it, on a GPU a head out of range gets NaN outputs).
    The kernels find ``tau`` with at most ``iterations`` safeguarded Newton steps, each a pass over the
    row's keys (default: 8 for sparsemax, whose support iteration is exact, else 14), stopping once no
    row's ``tau`` moves by more than 1e-6 of its size, then normalize the weights. They start from the
    threshold of the row's 16 largest logits alone (two per kv tile), a lower bound that is exact when
    those hold the row's support.
    """

    family = "threshold"
    exact_zeros = True

    def __init__(self, alpha: float | torch.Tensor = 1.5, iterations: int | None = None):
        if isinstance(alpha, torch.Tensor):
            _check_parameter("Entmax(alpha=...)", alpha)
        elif real(alpha) is None or not 1 < alpha <= 2:
            raise ValueError(f"Entmax(alpha=...) must be a number in (1, 2] or a per-head tensor, got {alpha!r}")
        if iterations is not None and (integer(iterations) is None or not 1 <= iterations <= 64):
            raise ValueError(f"Entmax(iterations=...) must be an int between 1 and 64, got {iterations!r}")
        self.alpha = alpha if isinstance(alpha, torch.Tensor) else float(alpha)
        self.iterations = integer(iterations) or (8 if not self.per_head and self.alpha == 2.0 else 14)

    @property
    def per_head(self) -> bool:
        """Whether ``alpha`` is a tensor with a value per head (read by the kernels at each call)."""
        return isinstance(self.alpha, torch.Tensor)


def Sparsemax(iterations: int | None = None) -> Entmax:  # noqa: N802 - reads like the class it stands for
    """Sparsemax (Martins & Astudillo 2016): the Euclidean projection of the logits onto the simplex,
    ``p_j = [l_j - tau]_+``; ``Entmax(alpha=2)``."""
    return Entmax(alpha=2.0, iterations=iterations)


class StickBreaking(Normalization):
    """Stick-breaking attention (Tan et al. 2024): going from the last kept key of a row backwards,
    key ``j`` takes the fraction ``sigmoid(l_j)`` of what the later keys left,
    ``p_j = sigmoid(l_j) * prod_{k kept, k > j} (1 - sigmoid(l_k))``; the weights sum to at most 1
    (what remains is attended to nothing). Meant with a causal mask, so that "later" means nearer
    to the query; computed in log space, the kv tiles visited right to left."""

    family = "stick_breaking"


class Softpick(Normalization):
    """Softpick (Zuhri et al. 2025), a rectified softmax: ``p_j = relu(exp(l_j) - 1) / (sum_k |exp(l_k) - 1| + eps)``
    over the kept keys. Keys with ``l_j <= 0`` weigh exactly 0 yet count in the denominator, and a row's
    weights sum to less than 1 (no attention sink is needed to attend to nothing). Runs as the online
    softmax with its running max starting at 0; it has no log-sum-exp, so no statistics."""

    family = "rectified"
    exact_zeros = True

    def __init__(self, eps: float = 1e-8):
        self.eps = _check_eps("Softpick(eps=...)", eps)
