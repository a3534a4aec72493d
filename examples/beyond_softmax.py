"""Normalizations side by side: what each does to the same causal scores.

With v the identity matrix (Dv = Lk), the attention output is the weight matrix itself, so the
kernels show their weights: how much each row gives out in all, how many weights are exactly 0,
how many are negative, and the rows' mean entropy where the weights are a distribution (stick-breaking's
counts the stick its keys leave as one more outcome). Every variant is checked against the float64
reference first (forward and backward, the entropy's gradient too), then its weights are summarized.
"""

import torch

import attngen as ag
from attngen.testing import assert_matches_reference

NORMALIZATIONS = {
    "softmax": ag.norms.Softmax(),
    "softmax + sink": ag.norms.Softmax(sink=torch.zeros(4, requires_grad=True)),
    "softpick": ag.norms.Softpick(),
    "signed softmax (Cog)": ag.norms.SignedSoftmax(),
    "sparsemax": ag.norms.Sparsemax(),
    "1.5-entmax": ag.norms.Entmax(1.5),
    "stick-breaking": ag.norms.StickBreaking(),
    "polynomial s^4": ag.norms.Normalized(lambda s: s ** 4),
    "sigmoid - log n": ag.norms.Sigmoid(bias="-log n"),
}

length = 64
gen = torch.Generator().manual_seed(0)
q, k = (2.0 * torch.randn(1, 4, length, 32, generator=gen) for _ in range(2))
eye = torch.eye(length).expand(1, 4, length, length)  # v = I: out = the weights

print(f"{'normalization':<22} {'row sums':>15} {'zeros':>7} {'negative':>9} {'entropy':>8}")
for name, normalization in NORMALIZATIONS.items():
    distribution = normalization.family in ("softmax",) + ag.stats.ENTROPY_FAMILIES
    spec = ag.AttentionSpec(normalization=normalization, mask_mod=ag.masks.causal,
                            stats=("entropy",) if distribution else ())
    v = torch.randn(1, 4, length, 32, generator=gen)
    assert_matches_reference(spec, q.clone().requires_grad_(), k.clone().requires_grad_(), v.requires_grad_())
    weights, stats = ag.compile(spec)(q, k, eye.contiguous(), return_stats=True)
    kept = torch.ones(length, length, dtype=torch.bool).tril()  # causal: the weights that could be nonzero
    sums = weights.sum(-1)
    zeros = (weights[..., kept] == 0).float().mean().item()
    negative = (weights[..., kept] < 0).float().mean().item()
    entropy = f"{stats.entropy.mean().item():8.3f}" if distribution else f"{'-':>8}"
    print(f"{name:<22} {sums.min().item():7.3f}..{sums.max().item():<6.3f} {zeros:7.1%} {negative:9.1%} {entropy}")
