"""Fused statistics (lse, max, entropy, expectations, column sums, pooled maps, support) vs float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attngen as ag
from attngen import norms
from attngen.codegen.render import map_lines
from attngen.stats import ENTROPY_FAMILIES, forward_only
from attngen.testing import assert_matches_reference
from checks import check_variant, fills
from variants import VARIANTS, Case, Variant, case_id


def _distance(score, b, h, q_idx, kv_idx):
    return torch.abs(q_idx - kv_idx) * 1.0


def _soft_relu(score, b, h, q_idx, kv_idx):
    return torch.tanh(score) * score + 0.1 * (kv_idx % 3)


STATS = {
    "lse": ("lse",),
    "max": ("lse", "max"),
    "entropy": ("entropy",),
    "expectation_distance": (ag.stats.expectation(_distance, name="distance"),),
    "all": ("lse", "max", "entropy", ag.stats.expectation(_soft_relu, name="soft"),
            ag.stats.expectation(_distance, name="distance")),
    "col_sum": ("col_sum",),
    "col_sum_heads": (ag.stats.col_sum(reduce_heads=True),),
    "pooled": (ag.stats.pooled(16, 8, "mean"), ag.stats.pooled(5, 7, "sum", name="coarse"), "entropy"),
}
BASES = {v.name: v for v in VARIANTS if v.name in ("alibi", "causal", "document", "sliding_window", "empty_rows")}
CASES = [Case(1, 2, 2, 37, 37, 16, 16), Case(1, 4, 2, 29, 50, 32, 16), Case(2, 2, 1, 64, 64, 16, 32)]


def _with_stats(base: Variant, stats, normalization=None) -> Variant:
    def spec(c):
        changes = {"stats": stats}
        if normalization is not None:
            changes["normalization"] = normalization(c)
        return dataclasses.replace(base.spec(c), **changes)
    return Variant(f"{base.name}+stats", base.captures, spec)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("stats", STATS)
def test_statistics_and_their_gradients_match_reference(stats, base, case):
    check_variant(_with_stats(BASES[base], STATS[stats]), case)


def test_statistics_left_out_of_the_loss_cost_the_backward_nothing():
    """Statistics kept for monitoring (max, entropy, a pooled map) and left out of the loss: the backward
    kernels skip their terms (HAS_DSTATS), nothing is filled for them (3 fills before) and the maps' row-dot
    pass does not run; q, k and v get exactly the gradients of the same attention without statistics.
    With one of them in the loss, the others' terms are zeros (against float64)."""
    q, k, v = Case(2, 4, 2, 45, 40, 16, 16, seed=3).tensors()
    grad_out = torch.randn(2, 4, 45, 16, generator=torch.Generator().manual_seed(0))
    monitored = ("lse", "max", "entropy", ag.stats.pooled(16, 8, "mean", name="map"))
    out_only = []
    for stats in (monitored, ()):
        spec = ag.AttentionSpec(mask_mod=ag.masks.causal, stats=stats)
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = ag.compile(spec)(*inputs)
        assert not fills(lambda: out.backward(grad_out))
        out_only.append([t.grad for t in inputs])
    for with_stats, without in zip(*out_only):
        assert torch.equal(with_stats, without)
    spec = ag.AttentionSpec(mask_mod=ag.masks.causal, stats=("entropy", "max"))
    with_entropy = []
    for run, dtype in ((ag.compile(spec), torch.float32), (lambda *t, **kw: ag.reference.attention(*t, spec, **kw),
                                                           torch.float64)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, returned = run(*inputs, return_stats=True)
        ((out * grad_out.to(dtype)).sum() + returned.entropy.sum()).backward()  # the max left out
        with_entropy.append([t.grad for t in inputs])
    for kernel, reference in zip(*with_entropy):
        torch.testing.assert_close(kernel.double(), reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("normalization", [
    lambda c: norms.Softmax(sink=0.3), lambda c: norms.ScalableSoftmax(s=0.8, count="unmasked")],
    ids=["sink", "scalable"])
def test_max_and_expectations_with_other_softmax_normalizations(normalization):
    stats = ("lse", "max", ag.stats.expectation(_soft_relu, name="soft"))
    check_variant(_with_stats(BASES["causal"], stats, normalization), Case(1, 2, 2, 45, 45, 16, 16))


@pytest.mark.parametrize("sink", [0.0, torch.tensor([0.5, -1.0, 2.0, 0.3], requires_grad=True)], ids=["softmax1", "learnable"])
def test_entropy_with_a_sink(sink):
    """The entropy of the distribution over the keys and the sink, -sum_j p_j log p_j - p_s log p_s, as
    computed from the materialized float64 weights (0 on rows without keys, all weight on the sink); with
    its gradients, the learnable sink's among them."""
    spec = ag.AttentionSpec(normalization=norms.Softmax(sink=sink), stats=("entropy", "lse"),
                            mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 2)
    q, k, v = Case(2, 4, 2, 37, 37, 16, 16, seed=4).tensors()
    assert_matches_reference(spec, q, k, v)
    _, stats = ag.compile(spec)(q, k, v, return_stats=True)
    s, keep = ag.reference.scores(q.double(), k.double(), spec)
    p, lse, _ = ag.reference.weights(s, keep, spec.normalization)
    sink_logit = torch.as_tensor(sink, dtype=torch.float64).detach().expand(4)[:, None]
    p_sink = torch.exp(sink_logit - lse)
    expected = -torch.where(p > 0, p * torch.log(p), 0.0).sum(-1) - p_sink * torch.log(p_sink)
    torch.testing.assert_close(stats.entropy.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.all(stats.entropy[:, :, :2] == 0) and torch.all(stats.entropy[:, :, 2:] > 0)


def test_pooled_max_is_forward_only():
    stat = ag.stats.pooled(4, 4, "max", name="peak")
    spec = ag.AttentionSpec(mask_mod=ag.masks.causal, stats=(stat,))
    q, k, v = Case(1, 2, 2, 19, 23, 16, 16, seed=0).tensors()
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    out, stats = ag.compile(spec)(q, k, v, return_stats=True)
    _, ref = ag.reference.attention(q64, k64, v64, spec, return_stats=True)
    torch.testing.assert_close(stats.peak.double(), ref.peak, atol=1e-6, rtol=1e-5)
    out.sum().backward()  # gradients of the output still work
    with pytest.raises(RuntimeError, match="'peak' \\(reduce='max'\\) is forward-only"):
        _, stats = ag.compile(spec)(q, k, v, return_stats=True)
        stats.peak.sum().backward()


def test_col_sums_of_a_softmax_add_up_to_the_number_of_rows():
    q, k, v = Case(1, 2, 2, 33, 40, 16, 16, seed=2).tensors()
    _, stats = ag.compile(ag.AttentionSpec(stats=("col_sum",)))(q, k, v, return_stats=True)
    torch.testing.assert_close(stats.col_sum.sum(-1), torch.full((1, 2), 33.0))


def test_empty_rows_have_zero_entropy_and_expectations_and_minus_inf_max():
    spec = ag.AttentionSpec(mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 3,
                            stats=("max", "entropy", ag.stats.expectation(_distance, name="distance")))
    q, k, v = Case(1, 1, 1, 10, 10, 16, 16, seed=0).tensors()
    _, stats = ag.compile(spec)(q, k, v, return_stats=True)
    assert torch.all(stats.max[..., :3] == float("-inf")) and torch.all(stats.entropy[..., :3] == 0)
    assert torch.all(stats.distance[..., :3] == 0)


def test_entropy_of_uniform_attention_is_log_n():
    q = torch.zeros(1, 1, 5, 16)
    k, v = torch.randn(1, 1, 12, 16), torch.randn(1, 1, 12, 16)
    _, stats = ag.compile(ag.AttentionSpec(stats=("entropy",)))(q, k, v, return_stats=True)
    torch.testing.assert_close(stats.entropy, torch.full((1, 1, 5), torch.log(torch.tensor(12.0)).item()))


def test_no_attention_matrix_is_materialized():
    """Structure: the generated kernels allocate nothing that grows like Lq x Lk."""
    spec = ag.AttentionSpec(mask_mod=ag.masks.causal, stats=("lse", "max", "entropy", "col_sum",
                                                             ag.stats.expectation(_distance, name="distance")))
    source = ag.compile(spec).source
    launchers = source.split("# --- launchers")[1]
    allocations = [line for line in launchers.splitlines()
                   if any(f in line for f in ("torch.zeros", "torch.full", "torch.empty", "new_empty"))]
    assert len(allocations) >= 5 and not any("LQ" in line and "LK" in line for line in allocations), allocations


@pytest.mark.parametrize("kwargs, message", [
    (dict(stats=("bogus",)), "unsupported stat 'bogus'"),
    (dict(stats=("lse", "lse")), "must be unique"),
    (dict(stats=("col_sum", ag.stats.col_sum())), "must be unique"),
    (dict(normalization=norms.AffineSoftmax(), stats=("col_sum",)), "need a probability distribution"),
    (dict(normalization=norms.Softpick(), stats=("max", "lse")), r"stats \['lse'\] are not defined for Softpick"),
    (dict(normalization=norms.AffineSoftmax(), stats=("entropy",)), "need a probability distribution"),
    (dict(stats=("support",)), "defined for Sparsemax, Entmax, Softpick and ReLU, whose weights have exact zeros, "
                               "not for Softmax"),
    (dict(normalization=norms.Sigmoid(), stats=("support",)), "not for Sigmoid"),
    (dict(normalization=norms.Sparsemax(), stats=("support", "lse")), r"stats \['lse'\] are not defined for Entmax"),
    (dict(normalization=norms.AffineSoftmax(), stats=(ag.stats.expectation(lambda s, b, h, q_idx, kv_idx: s, "mean"),)),
     r"stats \['mean'\] need a probability distribution"),
    (dict(normalization=norms.Softpick(), mask_mod=ag.masks.causal, stats=("col_sum", "entropy")),
     r"stats \['entropy'\] are not defined for Softpick: they are statistics of a softmax"),
])
def test_bad_stats(kwargs, message):
    with pytest.raises(ag.SpecError, match=message):
        ag.AttentionSpec(**kwargs)


def test_bad_pooled_maps():
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        ag.stats.pooled(0, 4)
    with pytest.raises(ValueError, match="reduce must be one of"):
        ag.stats.pooled(4, 4, "median")


def test_bad_expectations():
    with pytest.raises(TypeError, match="must take"):
        ag.stats.expectation(lambda s: s, name="x")
    with pytest.raises(ValueError, match="identifier"):
        ag.stats.expectation(_distance, name="not valid")
    table = torch.rand(4, requires_grad=True)
    spec = ag.AttentionSpec(stats=(ag.stats.expectation(lambda s, b, h, q, k: s * table[h], name="t"),))
    with pytest.raises(ag.SpecError, match="reads a captured tensor that requires grad"):
        ag.compile(spec)
    shared = ag.AttentionSpec(score_mod=lambda s, b, h, q, k: s + table[h],  # also captured by score_mod
                              stats=(ag.stats.expectation(lambda s, b, h, q, k: s * table[h], name="t"),))
    with pytest.raises(ag.SpecError, match="reads a captured tensor that requires grad"):
        ag.compile(shared)


@pytest.mark.parametrize("mode", ["auto", "decode"])
def test_max_gradient_goes_to_the_first_of_tied_keys(mode):
    """Like torch.max(dim): of keys tied for the maximum, the first gets its gradient (the kernels find it by
    its index: the backward's recomputed scores need not equal the forward's bit for bit); ties within a
    tile, across tiles and across split-KV partials (mode="decode")."""
    gen = torch.Generator().manual_seed(0)
    k_row = torch.randn(1, 1, 1, 16, generator=gen)
    k = torch.randn(1, 1, 200, 16, generator=gen)
    k[:, :, [20, 21, 150, 199]] = k_row  # identical keys: each row's maximum
    q = k_row.expand(1, 1, 4, 16).clone() * 3.0
    assert_matches_reference(ag.AttentionSpec(stats=("max",)), q, k, torch.randn(1, 1, 200, 16, generator=gen),
                             mode=mode)


@pytest.mark.parametrize("normalization", [norms.Sigmoid(), norms.ReLU(power=2), norms.Normalized(torch.sigmoid)],
                         ids=lambda n: type(n).__name__)
def test_max_statistic_of_weights_trains_the_score_mod(normalization):
    """The elementwise and normalized families' max is score_mod's largest result per row, of which their
    score is a weight: its gradient takes that logit's own derivatives (logit_fn_backward), to q, k and the
    score_mod's learnable tensors read per head, per query, per key and per (query, key)."""
    gen = torch.Generator().manual_seed(0)
    slope, row_bias, col_bias = (torch.randn(n, generator=gen).requires_grad_() for n in (2, 37, 45))
    table = torch.randn(37, 45, generator=gen).requires_grad_()

    def biased(score, b, h, q_idx, kv_idx):
        return 2.0 * score + 0.1 * slope[h] * (q_idx - kv_idx) + row_bias[q_idx] + col_bias[kv_idx] \
            + table[q_idx, kv_idx]
    spec = ag.AttentionSpec(score_mod=biased, normalization=normalization, stats=("max",),
                            mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + 3)
    q, k, v = Case(1, 2, 2, 37, 45, 16, 8, seed=3).tensors()
    compared = {r.name for r in assert_matches_reference(spec, q, k, v)}
    assert {"max", "dq", "dk", "d capture0", "d capture1", "d capture2", "d capture3"} <= compared


def test_statistics_of_weights_pass_over_nan_at_masked_keys():
    """score_mod may be undefined where mask_mod drops the key (sqrt of a negative distance): the logit's
    derivatives there are NaN, and the max's and an expectation's terms leave them out as dS does."""
    spec = ag.AttentionSpec(normalization=norms.Sigmoid(), mask_mod=ag.masks.causal, stats=("max", DISTANCE),
                            score_mod=lambda s, b, h, q_idx, kv_idx: s * torch.sqrt((q_idx - kv_idx) * 0.1 + 1.0))
    assert_matches_reference(spec, *Case(1, 2, 2, 29, 29, 16, 8, seed=2).tensors())


def _drops_every_third_key(score, b, h, q_idx, kv_idx):
    return torch.where(kv_idx % 3 == 1, float("-inf"), score)


@pytest.mark.parametrize("normalization, entropy", [
    (norms.Softmax(), True), (norms.Softmax(sink=0.5), True), (norms.StickBreaking(), True), (norms.Entmax(1.5), True),
    (norms.Sigmoid(), False), (norms.Softpick(), False), (norms.SignedSoftmax(), False)], ids=repr)
def test_statistics_pass_over_the_keys_score_mod_drops(normalization, entropy):
    """A key score_mod sets to -inf (FlexAttention's way to drop one) has no weight: it adds nothing to an
    expectation whose g is infinite there (the logit's square), nor to the entropy (a softmax's is its lse less the
    mean logit; stick-breaking's sums an expectation). Both were NaN, forward and backward, the reference too."""
    square = ag.stats.expectation(lambda s, b, h, q_idx, kv_idx: s * s * 0.1, name="square")
    spec = ag.AttentionSpec(normalization=normalization, score_mod=_drops_every_third_key, mask_mod=ag.masks.causal,
                            stats=(square, "entropy") if entropy else (square,))
    q, k, v = Case(1, 2, 2, 29, 29, 16, 8, seed=3).tensors()
    out, stats = ag.compile(spec)(q, k, v, return_stats=True)
    (out.sum() + sum(getattr(stats, name).sum() for name in stats.names())).backward()
    assert all(getattr(stats, name).isfinite().all() for name in stats.names())
    assert all(t.grad.isfinite().all() for t in (q, k, v))
    assert_matches_reference(spec, *(t.detach().requires_grad_() for t in (q, k, v)))


def _drops_keys_and_a_row(score, b, h, q_idx, kv_idx):
    return torch.where((kv_idx % 3 == 1) | (q_idx == 4), float("-inf"), score)


@pytest.mark.parametrize("spec", [
    ag.AttentionSpec(normalization=norms.Entmax(torch.tensor([1.2, 1.5, 1.8, 2.0], requires_grad=True))),
    ag.AttentionSpec(normalization=norms.Softmax(sink=torch.tensor([0.5, -1.0, 0.0, 1.0], requires_grad=True))),
    ag.AttentionSpec(normalization=norms.AffineSoftmax(torch.tensor([1.0, 0.5, 2.0, 1.5], requires_grad=True),
                                                      torch.tensor([0.0, 0.1, -0.1, 0.2], requires_grad=True))),
    ag.AttentionSpec(differential=torch.tensor([0.5, 0.2, 0.8, 0.1], requires_grad=True)),
    ag.AttentionSpec(normalization=norms.ScalableSoftmax(torch.tensor([1.0, 0.5, 2.0, 1.5], requires_grad=True)))],
    ids=["entmax", "sink", "affine", "differential", "scalable"])
def test_learned_parameters_pass_over_the_keys_score_mod_drops(spec):
    """Keys score_mod drops with -inf, and a row it drops whole, pass the normalization's learned parameters no
    gradient: the reference's entmax gave alpha (alpha - 1) * -inf's NaN gradient (fuzz seed 1047), the kernels 0;
    scalable softmax's s * log(n) * -inf made s's gradient NaN in both (so they agreed)."""
    spec = dataclasses.replace(spec, score_mod=_drops_keys_and_a_row, mask_mod=ag.masks.causal)
    q, k, v = Case(1, 4, 2, 23, 23, 16, 8, seed=5).tensors()
    assert_matches_reference(spec, q, k, v)  # NaN against NaN counts as exact there: the gradients must be finite
    learned = ag.testing.learnable(spec)
    out = ag.compile(spec)(q, k, v)
    grads = torch.autograd.grad(out.sum(), list(learned.values()))
    assert all(g.isfinite().all() and g.abs().sum() > 0 for g in grads)


def test_expectations_guard_only_logits_that_can_be_minus_inf():
    """The guard is two selects per score and expectation (sm_90, bf16, D=64, causal softmax with its entropy in the
    loss: forward loops 414 + 729 -> 481 + 863 instructions, dQ 337 + 758 -> 444 + 968): built where score_mod can
    make a logit -inf (a -inf constant, a log, a float table), not for finite ones (qk alone, a softcap)."""
    slopes = torch.tensor([0.1, 0.2])
    guarded = {None: False, lambda s, b, h, q, k: 20.0 * torch.tanh(s / 20.0): False,
               lambda s, b, h, q, k: s ** 2 / 3.0 - (q // 2) % 3: False,
               _drops_every_third_key: True, lambda s, b, h, q, k: s - slopes[h] * (q - k): True,
               lambda s, b, h, q, k: s + torch.log((q - k).abs().float()): True,
               lambda s, b, h, q, k: s / (q - k).float(): True}
    for score_mod, guard in guarded.items():
        source = ag.compile(ag.AttentionSpec(score_mod=score_mod, stats=("entropy",))).source
        assert ('live = logit != float("-inf")' in source) == guard, score_mod


def test_a_weight_of_minus_inf_logits_keeps_them_in_expectations():
    """Normalized weights fn(l) = relu(l)^2 + 0.1 weigh 0.1 at a logit of -inf: such a key is in the output, and in
    the expectations (g finite there), as the weights' own definition says; sigmoid's and ReLU's vanish there."""
    assert not norms.Normalized(lambda s: torch.clamp(s, min=0.0) ** 2 + 0.1).drops_minus_inf()
    assert all(n.drops_minus_inf() for n in (norms.Sigmoid(bias=torch.tensor([0.5, -1.0])), norms.Sigmoid(bias="-log n"),
                                             norms.ReLU(power=2), norms.Elementwise(torch.sigmoid), norms.Softpick()))
    spec = ag.AttentionSpec(normalization=norms.Normalized(lambda s: torch.clamp(s, min=0.0) ** 2 + 0.1),
                            score_mod=_drops_every_third_key, stats=(DISTANCE,))
    assert_matches_reference(spec, *Case(1, 2, 2, 29, 29, 16, 8, seed=3).tensors())


def test_no_keys_with_a_learnable_sink_still_trains_the_sink():
    sink = torch.tensor([0.5, -1.0], requires_grad=True)
    spec = ag.AttentionSpec(normalization=norms.Softmax(sink=sink))
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 16)
    out, stats = ag.compile(spec)(q, k, v, return_stats=True)
    assert torch.all(out == 0)
    torch.testing.assert_close(stats.lse, sink.detach()[None, :, None].expand(1, 2, 5))
    assert_matches_reference(spec, q, k, v)


@pytest.mark.parametrize("stat", [ag.stats.col_sum(), ag.stats.pooled(1, 1, "mean", name="map"),
                                  ag.stats.pooled(5, 3, "sum", name="map")], ids=repr)
def test_maps_with_a_learnable_sink(stat):
    """Found by the fuzzer: the sink's gradient missed the maps' row-dot term, and "mean" maps
    gave NaN gradients when Lk was not a multiple of the tile (inf * 0 past the last key)."""
    sink = torch.tensor([0.5, -1.0, 0.0, 0.3], requires_grad=True)
    spec = ag.AttentionSpec(normalization=norms.Softmax(sink=sink), stats=(stat,))
    assert_matches_reference(spec, *Case(2, 4, 2, 33, 3, 16, 8).tensors())


def test_maps_with_a_mask_mixing_program_scalars_and_tiles():
    """Found by the fuzzer: h != b (one bool per program) combined with a tile made Triton's
    interpreter hand an int8 mask to the maps' atomics."""
    spec = ag.AttentionSpec(mask_mod=lambda b, h, q_idx, kv_idx: ~((h != b) | (kv_idx > q_idx)),
                            stats=(ag.stats.col_sum(), ag.stats.pooled(5, 1, "mean", name="map")))
    assert_matches_reference(spec, *Case(2, 4, 1, 1, 17, 8, 8).tensors())


def test_statistics_at_a_split_head_dim():
    """The maps' kernels (weights, row-dot pass) and the row statistics with q and k in two column parts
    (Dqk 40 = 32 + 16)."""
    spec = ag.AttentionSpec(mask_mod=ag.masks.causal, stats=STATS["all"] + STATS["pooled"][:2] + STATS["col_sum"])
    assert_matches_reference(spec, *Case(2, 4, 2, 37, 45, 40, 24).tensors())


@pytest.mark.parametrize("stat", [ag.stats.col_sum(), ag.stats.pooled(16, 16), ag.stats.pooled(16, 16, "max"),
                                  ag.stats.col_sum(reduce_heads=True)], ids=str)
def test_map_offsets_are_int64(stat):
    """A map of block 16 at 128k tokens holds 2**26 entries per head: with 32 heads its element offsets pass
    2**31 (too large to allocate in a CPU test, so the generated offsets are checked for int64)."""
    offset = map_lines([stat])[0]
    assert offset.startswith("map_offset0 = ((") and ").to(tl.int64) * " in offset, offset


SPARSE = {"sparsemax": lambda h: norms.Sparsemax(), "entmax15": lambda h: norms.Entmax(1.5),
          "softpick": lambda h: norms.Softpick(), "relu2": lambda h: norms.ReLU(power=2),
          "entmax_per_head": lambda h: norms.Entmax(torch.linspace(1.2, 2.0, h).requires_grad_())}


def _matches_reference_packed(spec):
    """``spec`` on two packed sequences (17 and 23 tokens, 4 query heads to 2 kv heads) against the reference."""
    cu = torch.tensor([0, 17, 40])
    packed = [torch.randn(40, heads, 16, generator=torch.Generator().manual_seed(i))
              for i, heads in enumerate((4, 2, 2))]
    assert_matches_reference(spec, *packed, cu_seqlens_q=cu, cu_seqlens_k=cu)


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_support_counts_the_keys_of_nonzero_weight(name):
    """Each row's count of keys weighing more than 0 (rows without keys: 0), exactly the reference's; the
    outputs and gradients with it requested are unchanged, over a whole call, a KV cache (split-KV decoding
    adds up each split's counts; the threshold family does not split) and packed sequences."""
    def spec(heads):
        return ag.AttentionSpec(normalization=SPARSE[name](heads), stats=("support",),
                                mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 2)
    q, k, v = Case(2, 4, 2, 41, 41, 16, 16, seed=3).tensors()
    out, stats = ag.compile(spec(4))(q, k, v, return_stats=True)
    _, expected = ag.reference.attention(q.double(), k.double(), v.double(), spec(4), return_stats=True)
    assert torch.equal(stats.support.double(), expected.support) and stats.support.dtype == torch.float32
    assert torch.all(stats.support[:, :, :2] == 0) and stats.support.max() > 1 and (stats.support > 0).any()
    assert_matches_reference(spec(4), q, k, v)
    for mode in ("prefill", "decode"):
        assert_matches_reference(spec(4), q[:, :, :3], k, v, kv_lens=torch.tensor([41, 17]), mode=mode)
    _matches_reference_packed(spec(4))


DISTRIBUTIONS = {**{name: SPARSE[name] for name in ("sparsemax", "entmax15", "entmax_per_head")},
                 "polynomial": lambda h: norms.Normalized(lambda s: s ** 4, eps=1e-3),
                 "relu2_normalized": lambda h: norms.Normalized(lambda s: torch.clamp(s, min=0) ** 2)}


def test_stick_entropy_term_is_finite_at_every_logit():
    """Stick-breaking's entropy sums p_j g(l_j), g = h(sigmoid(l)) / sigmoid(l): in float32 g is finite at
    any logit (the naive softplus(-l) + e^-l softplus(l) overflows below l = -88, where p_j underflows: 0 * inf)
    and agrees with the float64 formula, and its limits are 1 - l (l -> -inf) and 0 (l -> inf)."""
    logits = torch.linspace(-300.0, 300.0, 6001)
    g = ag.stats.stick_entropy_term(logits, 0, 0, 0, 0)
    assert torch.isfinite(g).all()
    exact = logits.double()
    beta = torch.sigmoid(exact)
    expected = -(beta * torch.log(beta) + (1 - beta) * torch.log1p(-beta)) / beta
    moderate = exact.abs() < 30
    torch.testing.assert_close(g.double()[moderate], expected[moderate], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g[logits < -50], 1.0 - logits[logits < -50])
    assert torch.all(g[logits > 50] < 1e-19)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS) + ["stick_breaking"])
def test_entropy_beyond_the_softmax(name):
    """Sparsemax / entmax and normalized weights are distributions: their entropy -sum p log p (keys of
    weight 0 add 0) is compared with the reference, gradients too (a learnable alpha's included), over
    Lq != Lk with GQA and rows without keys (entropy exactly 0), a KV cache (split-KV decoding merges the
    normalized family's sums) and packed sequences; it lies in [0, log n + 1 - P] (n keys of nonzero weight
    summing to P: -P log P <= 1 - P; P < 1 where eps > 0). Stick-breaking's counts the stick left over,
    1 - P, as one more outcome (the kernels sum it as an expectation, the reference from the weights): in
    [0, log(n + 1)]."""
    stick = name == "stick_breaking"

    def spec(heads, mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 2):
        return ag.AttentionSpec(normalization=norms.StickBreaking() if stick else DISTRIBUTIONS[name](heads),
                                stats=("entropy", "col_sum"), mask_mod=mask_mod)
    q, k, v = Case(2, 4, 2, 37, 41, 16, 8, seed=4).tensors()
    assert_matches_reference(spec(4), q, k, v)
    _, stats = ag.compile(spec(4))(q, k, v, return_stats=True)
    _, expected = ag.reference.attention(q.double(), k.double(), v.double(), spec(4), return_stats=True)
    # v the identity: the output rows are the weights
    weights = ag.reference.attention(q.double(), k.double(), torch.eye(41, dtype=torch.float64).expand(2, 2, 41, 41),
                                     spec(4))
    kept = (weights > 0).sum(-1)
    bound = torch.log(kept + 1.0) if stick else torch.log(kept.clamp(min=1)) + 1.0 - weights.sum(-1).clamp(max=1.0)
    assert torch.equal(stats.entropy[:, :, :2], torch.zeros_like(stats.entropy[:, :, :2]))
    assert not torch.signbit(stats.entropy).any() and expected.entropy.max() > 0.5
    assert torch.all(stats.entropy <= bound + 1e-5)
    assert_matches_reference(spec(4, ag.masks.causal), q, k, v)
    for mode in ("prefill", "decode"):
        assert_matches_reference(spec(4), q[:, :, :3], k, v, kv_lens=torch.tensor([41, 17]), mode=mode)
    _matches_reference_packed(spec(4))


DISTANCE = ag.stats.expectation(lambda s, b, h, q_idx, kv_idx: (q_idx - kv_idx).float(), "distance")
CURVED = ag.stats.expectation(lambda s, b, h, q_idx, kv_idx: torch.tanh(s) * s, "curved")


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "entmax_per_head"])
def test_expectations_of_sparsemax_and_entmax(name):
    """Row expectations sum_j p_j g(l_j) of sparsemax / entmax weights, with the entropy and a map in the same
    spec: values and gradients (through the weights, the entmax Jacobian's, and directly through g's
    logit; a learnable alpha's only through the weights) against the reference, over GQA, Lq != Lk, rows
    without keys (0), a KV cache and packed sequences."""
    def spec(heads):
        return ag.AttentionSpec(normalization=DISTRIBUTIONS[name](heads),
                                stats=(DISTANCE, "entropy", CURVED, "col_sum"),
                                mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 2)
    q, k, v = Case(2, 4, 2, 37, 41, 16, 8, seed=6).tensors()
    assert_matches_reference(spec(4), q, k, v)
    _, stats = ag.compile(spec(4))(q, k, v, return_stats=True)
    assert torch.equal(stats.distance[:, :, :2], torch.zeros_like(stats.distance[:, :, :2]))
    assert torch.all(stats.distance[:, :, 2:] >= 2.0 - 1e-5)  # every kept key lies 2 or more back
    assert_matches_reference(spec(4), q[:, :, :3], k, v, kv_lens=torch.tensor([41, 17]))
    _matches_reference_packed(spec(4))


@pytest.mark.parametrize("normalization", [norms.StickBreaking(), norms.Sigmoid(bias="-log n"), norms.ReLU(power=2),
                                           norms.Normalized(torch.sigmoid), norms.Softpick(eps=1e-2),
                                           norms.SignedSoftmax()], ids=lambda n: type(n).__name__)
def test_expectations_beyond_distributions(normalization):
    """Row expectations sum_j p_j g(l_j) with the weights the output takes, not divided by their sum where it
    is not 1: stick-breaking's (at most 1), softpick's (at most 1), signed softmax's (negative too), sigmoid's,
    ReLU's and normalized weights' (l_j score_mod's result, whose weight the score is); with the max and a map
    in the same spec and a learnable slope: values and gradients (through the weights, as a value column's, and
    directly through g's logit: the weight families' by logit_fn_backward) against the reference, over GQA,
    Lq != Lk, rows without keys (0), a KV cache (split-KV decoding joins the chunks' sums: stick-breaking's
    scaled as their outputs, the online softmaxes' rescaled), dropout and packed sequences. Stick-breaking and
    normalized weights with their entropy too (stick-breaking sums its terms from the shares, beside the traced
    expectations)."""
    slopes = torch.tensor([0.3, 0.1, 0.05, 0.2], requires_grad=True)
    entropy = ("entropy",) if normalization.family in ENTROPY_FAMILIES else ()
    spec = ag.AttentionSpec(normalization=normalization, stats=(DISTANCE, "max", CURVED, "col_sum", *entropy),
                            score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx),
                            mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 2)
    q, k, v = Case(2, 4, 2, 37, 41, 16, 8, seed=6).tensors()
    assert_matches_reference(spec, q, k, v)
    _, stats = ag.compile(spec)(q, k, v, return_stats=True)
    assert torch.equal(stats.distance[:, :, :2], torch.zeros_like(stats.distance[:, :, :2]))
    if normalization.family != "signed":  # every kept key lies 2 or more back (ReLU's weights may all be 0)
        assert torch.all(stats.distance[:, :, 2:] >= 0) and torch.all(stats.distance[:, :, 2:].sum(-1) > 0)
    for mode in ("auto", "decode"):
        assert_matches_reference(spec, q[:, :, :3], k, v, kv_lens=torch.tensor([41, 17]), mode=mode)
    assert_matches_reference(spec, q, k, v, dropout_p=0.2)
    _matches_reference_packed(spec)


OTHER_FAMILIES = {"sigmoid": lambda h: norms.Sigmoid(bias="-log n"), "relu2": lambda h: norms.ReLU(power=2),
                  "sparsemax": lambda h: norms.Sparsemax(), "entmax15": lambda h: norms.Entmax(1.5),
                  "entmax_per_head": lambda h: norms.Entmax(torch.linspace(1.2, 2.0, h).requires_grad_()),
                  "softpick": lambda h: norms.Softpick(eps=1e-2), "signed": lambda h: norms.SignedSoftmax(),
                  "polynomial": lambda h: norms.Normalized(lambda s: s ** 4), "stick": lambda h: norms.StickBreaking()}
MAPS = (ag.stats.col_sum(), ag.stats.col_sum(reduce_heads=True, name="per_kv_head"),
        ag.stats.pooled(4, 8, "mean", name="mean"), ag.stats.pooled(5, 3, "sum", name="sums"),
        ag.stats.pooled(8, 8, "max", name="peak"))


@pytest.mark.parametrize("name", sorted(OTHER_FAMILIES))
def test_maps_of_the_other_normalizations_match_reference(name):
    """Column sums and pooled maps of every family's weights, with gradients (but the pooled max's): over a
    call with GQA and an offset mask, a KV cache (split-KV decoding sums the splits' maps; the threshold
    family does not split), fully masked rows and packed sequences."""
    def spec(heads, maps=MAPS, mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + 3):
        return ag.AttentionSpec(normalization=OTHER_FAMILIES[name](heads), stats=maps, mask_mod=mask_mod)
    q, k, v = Case(2, 4, 2, 33, 41, 16, 16, seed=5).tensors()
    assert_matches_reference(spec(4), q, k, v)
    assert_matches_reference(spec(4, MAPS[:3], lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - 3), q, k, v)
    _, stats = ag.compile(spec(4))(q, k, v, return_stats=True)
    assert stats.col_sum.abs().sum() > 0 and (stats.col_sum[..., 37:] == 0).all()  # keys past every row's reach
    for mode in ("prefill", "decode"):
        assert_matches_reference(spec(4), q[:, :, :3], k, v, kv_lens=torch.tensor([41, 17]), mode=mode)
    _matches_reference_packed(spec(4, MAPS[:2]))
    assert set(forward_only(spec(4).stats)) == {"peak"}  # the others compared with gradients
