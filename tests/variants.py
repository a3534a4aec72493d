"""Attention variants used across the tests.

A variant makes its captured tensors for a shape, then builds a spec from
them, so the same variant can be instantiated with float32 captures for the
kernel and float64 copies for the reference.
"""

from __future__ import annotations

import pathlib
import runpy
from dataclasses import dataclass
from typing import Callable

import torch

import attngen as ag
from attngen.testing import Case


def case_id(case: Case) -> str:
    return case.id


@dataclass(frozen=True)
class Variant:
    name: str
    captures: Callable[[Case, torch.Generator], dict]  # name -> tensor (learnable ones require grad)
    spec: Callable[[dict], ag.AttentionSpec]

    def __str__(self):
        return self.name


def _none(case, gen):
    return {}


def _slopes(case, gen):
    return {"slopes": torch.rand(case.q_heads, generator=gen).requires_grad_()}


def _bias(case, gen):
    table = torch.randn(case.q_heads, case.q_len + case.kv_len - 1, generator=gen)
    return {"bias": table.requires_grad_()}


def _documents(case, gen):
    length = max(case.q_len, case.kv_len)
    ids = torch.sort(torch.randint(0, 4, (case.batch, length), generator=gen), dim=1).values
    return {"doc": ids}


def _forget_gates(case, gen):
    length = max(case.q_len, case.kv_len)
    gates = torch.randn(case.batch, case.q_heads, length, generator=gen) + 2.0
    return {"log_f": torch.nn.functional.logsigmoid(gates).requires_grad_()}


def _forgetting_spec(c):
    """Forgetting Transformer (Lin et al. 2025): the score of key j for query i gains the sum of the log
    forget gates in (j, i], a difference of their running sums; the gates learn through the sums."""
    decay = c["log_f"].cumsum(-1)
    return ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + decay[b, h, q_idx] - decay[b, h, kv_idx],
                            mask_mod=ag.masks.causal)


def _fire_weights(case, gen):
    return {name: (scale * torch.randn(case.q_heads, 8, generator=gen)).requires_grad_()
            for name, scale in (("w1", 1.0), ("b1", 1.0), ("w2", 0.3))}


def _fire_spec(c):
    """FIRE (Li et al. 2023): a learnable per-head MLP of the log distance, normalized by the log of the
    query's position. log(q_idx - kv_idx + 1) is NaN above the diagonal, which the mask drops."""
    w1, b1, w2 = c["w1"], c["b1"], c["w2"]

    def fire(s, b, h, q_idx, kv_idx):
        x = torch.log((q_idx - kv_idx) * 1.0 + 1.0) / torch.log(q_idx * 1.0 + 2.0)
        return s + sum(w2[h, u] * torch.clamp(w1[h, u] * x + b1[h, u], min=0.0) for u in range(8))
    return ag.AttentionSpec(score_mod=fire, mask_mod=ag.masks.causal)


T5_BUCKET = runpy.run_path(str(pathlib.Path(__file__).parent.parent / "specs" / "t5_relative_bias.py"))["t5_bucket"]


def _t5_table(case, gen):
    return {"t5": (0.5 * torch.randn(case.q_heads, 32, generator=gen)).requires_grad_()}


def _t5_spec(c):
    """T5's decoder: a learnable bias per head and bucket of kv_idx - q_idx <= 0 (specs/t5_relative_bias.py
    tests the encoder's buckets of both signs); the conversions (.to(torch.long), .float(), zeros_like /
    full_like, two-tensor torch.min) trace as torch computes them."""
    table = c["t5"]
    return ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx:
                            s + table[h, T5_BUCKET(kv_idx - q_idx, bidirectional=False)], mask_mod=ag.masks.causal)


def _conversions(s, b, h, q_idx, kv_idx):
    """Each conversion and rounding against torch's: toward zero, floor and ceil of thirds of offsets
    (exact in float32: no score rounds at an integer), a comparison as a float, a float fill for an int,
    torch.div's two rounding modes."""
    third = (q_idx - kv_idx).float() / 3.0
    return (s + 0.2 * third.to(torch.int32) - 0.1 * torch.floor(third) + 0.05 * third.ceil()
            + 0.3 * (s > 0).to(torch.float32) + 0.01 * torch.full_like(q_idx, 2.7) * b.double()
            + 0.02 * torch.max(q_idx % 3, torch.ones_like(kv_idx)).to(dtype=torch.float64) + (h == 1).float()
            + 0.03 * torch.div(q_idx - kv_idx, 4, rounding_mode="trunc")
            + 0.04 * torch.div(kv_idx - q_idx, 3, rounding_mode="floor")
            + 0.05 * torch.div((kv_idx - q_idx).float(), 4.0, rounding_mode="trunc"))


def _math_functions(s, b, h, q_idx, kv_idx):
    """torch's math functions and torch.nn.functional's activations, against torch's own (also their
    gradients): cos / sin / erf are kernel functions, the others are composed of them."""
    F = torch.nn.functional
    near = 0.1 * (q_idx - kv_idx).float()
    return (0.5 * s + 0.3 * torch.cos(near) - 0.2 * torch.sin(s) + 0.1 * torch.erf(s) + 0.1 * F.relu(s)
            + 0.1 * F.softplus(s, beta=2.0) - 0.1 * F.silu(s) + 0.1 * F.logsigmoid(s) + 0.1 * F.gelu(s)
            + 0.05 * F.gelu(s, approximate="tanh") + 0.02 * torch.square(s) + 0.05 * torch.sign(s)
            + 0.1 * torch.rsqrt(1.0 + s * s) + 0.1 * torch.reciprocal(2.0 + torch.tanh(s)) + 0.1 * torch.exp2(0.3 * s)
            + 0.05 * torch.log2(1.0 + s * s) + 0.05 * torch.log10(2.0 + near.sin()) + 0.1 * torch.log1p(s * s)
            - 0.1 * torch.expm1(0.2 * s))


def _alibi_spec(c):
    slopes = c["slopes"]
    return ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx),
                            mask_mod=ag.masks.causal)


def _bias_spec(c):
    bias = c["bias"]

    def relative_bias(s, b, h, q_idx, kv_idx):
        return s + bias[h, q_idx - kv_idx + c["kv_len"] - 1]
    return ag.AttentionSpec(score_mod=relative_bias)


def _checkerboard(s, b, h, q_idx, kv_idx):
    return torch.where((q_idx // 3 + kv_idx // 5) % 2 == 0, s * 1.5, s - 1.0)


VARIANTS = [
    Variant("plain", _none, lambda c: ag.AttentionSpec()),
    Variant("causal", _none, lambda c: ag.AttentionSpec(mask_mod=ag.masks.causal)),
    Variant("alibi", _slopes, _alibi_spec),
    Variant("softcap", _none, lambda c: ag.AttentionSpec(
        score_mod=lambda s, b, h, q_idx, kv_idx: 2.0 * torch.tanh(s / 2.0))),
    Variant("forgetting", _forget_gates, _forgetting_spec),
    Variant("fire", _fire_weights, _fire_spec),
    Variant("relative_bias", lambda case, gen: {**_bias(case, gen), "kv_len": case.kv_len}, _bias_spec),
    Variant("document", _documents, lambda c: ag.AttentionSpec(mask_mod=ag.masks.document(c["doc"]))),
    Variant("sliding_window", _none, lambda c: ag.AttentionSpec(mask_mod=ag.masks.sliding_window(7))),
    Variant("prefix_lm", _none, lambda c: ag.AttentionSpec(mask_mod=ag.masks.prefix_lm(5))),
    Variant("empty_rows", _none, lambda c: ag.AttentionSpec(
        mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 3, scale=0.3)),
    Variant("checkerboard", _none, lambda c: ag.AttentionSpec(score_mod=_checkerboard)),
    Variant("t5_buckets", _t5_table, _t5_spec),
    Variant("conversions", _none, lambda c: ag.AttentionSpec(score_mod=_conversions)),
    Variant("math_functions", _none, lambda c: ag.AttentionSpec(score_mod=_math_functions, mask_mod=ag.masks.causal)),
]


def _polynomial(s, b, h, q_idx, kv_idx):
    return 0.05 * s ** 5 - (s * s + 1.0) ** 0.5 + torch.clamp(s, min=-1.0, max=1.0) * torch.sigmoid(s)


VARIANTS.append(Variant("polynomial", _none, lambda c: ag.AttentionSpec(score_mod=_polynomial)))
VARIANTS.append(Variant("integer_powers", _none, lambda c: ag.AttentionSpec(
    score_mod=lambda s, b, h, q_idx, kv_idx: s * (q_idx - kv_idx) ** 0 + 0.001 * ((q_idx + kv_idx) % 5) ** 2,
    mask_mod=lambda b, h, q_idx, kv_idx: ((kv_idx % 8) ** 5) % 7 != 5)))


def _allowed(case, gen):
    size = max(case.q_len, case.kv_len)
    return {"allowed": torch.rand(case.batch, size, size, generator=gen) > 0.3}


VARIANTS.append(Variant("bool_mask_tensor", _allowed, lambda c: ag.AttentionSpec(
    mask_mod=lambda b, h, q_idx, kv_idx: c["allowed"][b, q_idx, kv_idx] | (q_idx == kv_idx))))
