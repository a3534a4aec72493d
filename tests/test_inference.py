"""Inference and packed-training paths: KV caches with query offsets, packed sequences."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attngen as ag
from attngen.qkv import packed_positions
from attngen.runtime.variants import Variant
from attngen.testing import Case, assert_matches_reference

from checks import check_paged, paged_cache

masks = ag.masks


def _slopes(heads):
    return torch.linspace(0.1, 0.9, heads).requires_grad_()


SPECS = {
    "causal": lambda h: ag.AttentionSpec(mask_mod=masks.causal),
    "alibi_learnable": lambda h: (lambda slopes: ag.AttentionSpec(
        score_mod=lambda s, b, hh, q_idx, kv_idx: s - slopes[hh] * (q_idx - kv_idx) * 0.1,
        mask_mod=masks.causal))(_slopes(h)),
    "window": lambda h: ag.AttentionSpec(mask_mod=masks.sliding_window(9)),
    "sigmoid_log_n": lambda h: ag.AttentionSpec(normalization=ag.norms.Sigmoid(bias="-log n"), mask_mod=masks.causal),
    "learnable_sink": lambda h: ag.AttentionSpec(normalization=ag.norms.Softmax(sink=torch.zeros(h, requires_grad=True)),
                                                 stats=("lse", "max")),
    "relu_length": lambda h: ag.AttentionSpec(normalization=ag.norms.ReLU(power=2)),
    "entmax_learnable": lambda h: ag.AttentionSpec(normalization=ag.norms.Entmax(torch.linspace(1.3, 2.0, h).requires_grad_()),
                                                   mask_mod=masks.causal),
}


# -- KV caches -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("q_len", [1, 4])
def test_cache_with_lengths_matches_reference(name, q_len):
    case = Case(3, 4, 2, q_len, 70, 16, 8, seed=q_len)
    q, k, v = case.tensors()
    kv_lens = torch.tensor([70, 23, q_len])
    assert_matches_reference(SPECS[name](4), q, k, v, kv_lens=kv_lens)


def test_decoding_equals_the_last_row_of_full_attention():
    """The new token's output from the cache is the last row of causal attention over the sequence."""
    q, k, v = Case(2, 4, 2, 50, 64, 16, 16).tensors(requires_grad=False)
    spec = SPECS["alibi_learnable"](4)
    attn = ag.compile(spec)
    for length in (1, 37, 50):
        full = attn(q[:, :, :length], k[:, :, :length], v[:, :, :length])
        step = attn(q[:, :, length - 1:length], k, v, kv_lens=torch.tensor([length, length]))
        torch.testing.assert_close(step, full[:, :, -1:], atol=1e-5, rtol=1e-5)


DRIFT = ag.stats.expectation(lambda s, b, h, q_idx, kv_idx: torch.tanh(s) * (q_idx - kv_idx) + b, "drift")


def test_decoding_rows_expectations_equal_the_last_rows_of_full_attention():
    """A row expectation sees the query's position in the sequence (fuzz seed 19 found it seeing the
    row's index in the call, in the kernels and in the reference alike)."""
    q, k, v = Case(2, 4, 2, 50, 64, 16, 16).tensors(requires_grad=False)
    attn = ag.compile(ag.AttentionSpec(mask_mod=masks.causal, stats=("lse", DRIFT)))
    for length, rows in ((37, 1), (50, 5)):
        _, full = attn(q[:, :, :length], k[:, :, :length], v[:, :, :length], return_stats=True)
        for mode in ("prefill", "decode"):
            _, step = attn(q[:, :, length - rows:length], k, v, kv_lens=torch.tensor([length, length]), mode=mode,
                           return_stats=True)
            torch.testing.assert_close(step.drift, full.drift[:, :, -rows:], atol=1e-5, rtol=1e-5)

def test_explicit_query_offsets_and_empty_caches():
    q, k, v = Case(2, 2, 2, 3, 40, 16, 16).tensors()
    assert_matches_reference(SPECS["causal"](2), q, k, v, q_offset=torch.tensor([5, 30]))
    assert_matches_reference(SPECS["causal"](2), q, k, v, q_offset=12)
    out = ag.compile(SPECS["causal"](2))(q, k, v, kv_lens=torch.tensor([0, 40]))
    assert torch.all(out[0] == 0) and torch.isfinite(out).all()


EMPTY_CACHE_SPECS = {
    "sink_and_stats": SPECS["learnable_sink"],
    "sparsemax": lambda h: ag.AttentionSpec(normalization=ag.norms.Sparsemax()),
    "entmax": lambda h: ag.AttentionSpec(normalization=ag.norms.Entmax(1.5), mask_mod=masks.causal),
    "entmax_learnable": SPECS["entmax_learnable"],
    "stick_breaking": lambda h: ag.AttentionSpec(normalization=ag.norms.StickBreaking(), mask_mod=masks.causal),
    "softpick": lambda h: ag.AttentionSpec(normalization=ag.norms.Softpick(), mask_mod=masks.causal),
    "normalized": lambda h: ag.AttentionSpec(normalization=ag.norms.Normalized(torch.sigmoid), mask_mod=masks.causal),
    "signed_softmax": lambda h: ag.AttentionSpec(normalization=ag.norms.SignedSoftmax()),
    "differential": lambda h: ag.AttentionSpec(differential=0.5),
}


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("name", sorted(EMPTY_CACHE_SPECS))
def test_empty_caches_for_every_family(name, mode):
    """Found by the fuzzer (seeds 11 and 13): over an empty cache (kv_lens 0) a row has no logit; its
    output is 0, its max -inf and its lse the sink's (the reference's row max and entmax threshold
    failed on a row of no keys)."""
    q, k, v = Case(2, 4, 1, 2, 5, 8, 8).tensors()
    assert_matches_reference(EMPTY_CACHE_SPECS[name](4), q, k, v, kv_lens=torch.tensor([0, 3]), mode=mode)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("name", sorted(EMPTY_CACHE_SPECS))
def test_a_cache_may_hold_anything_past_kv_lens(name, mode):
    """A cache's keys past kv_lens[b] are not read, as FlashAttention's KV cache kernels read none: NaN
    there (memory a serving engine got from torch.empty) leaves the output, statistics and gradients the
    reference's (before: masked weights times NaN values made the rows NaN, and their gradients)."""
    q, k, v = (t.detach() for t in Case(2, 4, 2, 3, 45, 16, 16).tensors())
    lens = torch.tensor([17, 40])
    for b, n in enumerate(lens.tolist()):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
    assert_matches_reference(EMPTY_CACHE_SPECS[name](4), q, k, v, kv_lens=lens, mode=mode)


def test_cache_with_a_block_mask():
    """Block-sparse decoding: the block mask is over the call's own rows and the cache's keys."""
    q, k, v = Case(2, 2, 2, 2, 96, 16, 16).tensors()
    blocks = torch.tensor([[True, False, True], [False, True, True]]).view(2, 1, 1, 3)
    assert_matches_reference(SPECS["causal"](2), q, k, v, kv_lens=torch.tensor([96, 70]),
                             block_mask=ag.BlockMask(blocks, block_size=(2, 32)))


# -- split-KV decoding ----------------------------------------------------------------------

DECODE_SPECS = {
    **SPECS,
    "stats": lambda h: ag.AttentionSpec(mask_mod=masks.causal, stats=(
        "lse", "max", "entropy", ag.stats.expectation(lambda s, b, hh, q_idx, kv_idx: torch.tanh(s), "t"))),
    "affine": lambda h: ag.AttentionSpec(normalization=ag.norms.AffineSoftmax(
        alpha=torch.full((h,), 0.9, requires_grad=True), beta=0.01)),
    "maps": lambda h: ag.AttentionSpec(stats=("lse", "col_sum")),
    # softpick: split rows merge as an online softmax's, the normalizer's eps added once after the merge
    "softpick": lambda h: ag.AttentionSpec(normalization=ag.norms.Softpick(eps=1e-3), mask_mod=masks.causal),
    "signed_softmax": lambda h: ag.AttentionSpec(normalization=ag.norms.SignedSoftmax(), mask_mod=masks.causal),
    # normalized weights: the splits' sums of weights add up, eps once after
    "normalized": lambda h: ag.AttentionSpec(normalization=ag.norms.Normalized(lambda s: s * s, eps=1e-3)),
}


@pytest.mark.parametrize("name", sorted(DECODE_SPECS))
def test_split_kv_decoding_matches_reference(name):
    """mode="decode" splits each row's keys over programs and merges them (backward: the usual kernels)."""
    q, k, v = Case(2, 4, 2, 3, 150, 16, 8, seed=4).tensors()
    call = {} if name == "maps" else {"kv_lens": torch.tensor([150, 61])}
    assert_matches_reference(DECODE_SPECS[name](4), q, k, v, mode="decode", **call)


@pytest.mark.parametrize("normalization", [ag.norms.Softmax(), ag.norms.StickBreaking()], ids=str)
def test_block_sparse_split_kv_decoding_takes_shares_of_the_tile_lists(normalization):
    """Per-head block masks (Quest-style top-k blocks) while decoding: each split-KV program takes an
    even share of the listed live tiles (stick-breaking: last first), and the shares merge exactly."""
    q, k, v = Case(2, 4, 2, 3, 300, 16, 8, seed=2).tensors()
    blocks = torch.rand(2, 4, 1, 10, generator=torch.Generator().manual_seed(3)) > 0.5
    spec = ag.AttentionSpec(normalization=normalization, mask_mod=masks.causal)
    call = dict(kv_lens=torch.tensor([300, 170]), mode="decode", block_mask=ag.BlockMask(blocks, (3, 32)))
    assert_matches_reference(spec, q, k, v, **call)
    source = ag.compile(spec).for_call(Variant(block_size=(3, 32), cache=True, split_kv=True)).source
    assert "TILE_LISTS" in source and "share = (n_live + SPLITS - 1) // SPLITS" in source

PACKING_SPECS = {
    **DECODE_SPECS,
    "scalable_unmasked": lambda h: ag.AttentionSpec(normalization=ag.norms.ScalableSoftmax(s=0.4, count="unmasked"),
                                                    mask_mod=masks.sliding_window(40)),
    "per_head_window": lambda h: ag.AttentionSpec(  # a plan that depends on the head: not packed
        mask_mod=lambda b, hh, q_idx, kv_idx: (q_idx - kv_idx).abs() <= 8 + 20 * hh),
}


@pytest.mark.parametrize("name", sorted(PACKING_SPECS))
def test_gqa_packed_decoding_matches_reference(name):
    """Split-KV decoding packs the query heads sharing a kv head into one program's rows: with 4 query
    heads per kv head and 5 queries, 20 rows span two 16-row tiles and wrap from one head to the next."""
    q, k, v = Case(2, 8, 2, 5, 150, 16, 8, seed=5).tensors()
    call = {} if name == "maps" else {"kv_lens": torch.tensor([150, 61])}
    attn = ag.compile(PACKING_SPECS[name](8))
    packed = "GQA packing" in attn.for_call(ag.runtime.variants.Variant(cache="kv_lens" in call, split_kv=True)).source
    assert packed == (name not in ("per_head_window", "entmax_learnable"))  # entmax decodes unsplit
    assert_matches_reference(PACKING_SPECS[name](8), q, k, v, mode="decode", **call)


@pytest.mark.parametrize("mode", ["decode", None])
@pytest.mark.parametrize("name", ["causal", "entmax_learnable"])
def test_mla_decoding_over_one_latent_kv_head(name, mode):
    """MLA decodes in its absorbed form: 16 query heads over one kv head of head dims Dqk 576 (512 latent
    + 64 rotary), Dv 512, the values a strided view of the keys' latent part; a cache with per-batch lengths
    and two queries per step, split-KV or not."""
    q, k, _ = Case(2, 16, 1, 2, 90, 576, 512, seed=7).tensors()
    v = k.detach()[..., :512]
    assert_matches_reference(SPECS[name](16), q, k, v, mode=mode, kv_lens=torch.tensor([90, 41]))


@pytest.mark.parametrize("normalization", [ag.norms.Softmax(), ag.norms.StickBreaking()], ids=str)
def test_gqa_packed_decoding_loops_over_the_listed_tiles_of_a_data_dependent_mask(normalization):
    """A document mask while decoding has one plan for every head: GQA-packed split-KV programs take
    even shares of their rows' tile list, with no check of the tiles inside the loop."""
    doc = torch.sort(torch.randint(0, 4, (2, 300), generator=torch.Generator().manual_seed(0)), dim=1).values
    spec = ag.AttentionSpec(normalization=normalization, mask_mod=masks.document(doc))
    q, k, v = Case(2, 8, 2, 3, 300, 16, 8, seed=5).tensors()
    assert_matches_reference(spec, q, k, v, kv_lens=torch.tensor([300, 170]), mode="decode")
    source = ag.compile(spec).for_call(Variant(cache=True, split_kv=True)).source
    forward = source[source.index("def _attn_fwd("):source.index("def _attn_combine(")]
    assert "GQA packing" in forward and "share = (n_live + SPLITS - 1) // SPLITS" in forward
    assert "block_state(" not in forward


def test_gqa_packed_decoding_with_dropout_and_apaged_cache():
    k_pages, v_pages, table = paged_cache(batch=2, kv_heads=2)
    q = torch.randn(2, 8, 3, 16, generator=torch.Generator().manual_seed(6))
    kv_lens = torch.tensor([50, 17])
    spec = SPECS["alibi_learnable"](8)
    paged = ag.compile(spec)(q, k_pages, v_pages, kv_lens=kv_lens, block_table=table, mode="decode")
    unsplit = ag.compile(spec)(q, k_pages, v_pages, kv_lens=kv_lens, block_table=table, mode="prefill")
    torch.testing.assert_close(paged, unsplit, atol=1e-6, rtol=1e-6)
    k, v = (torch.randn(2, 2, 60, 16, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    attn = ag.compile(ag.AttentionSpec(mask_mod=masks.causal, dropout_p=0.3))
    torch.testing.assert_close(attn(q, k, v, kv_lens=kv_lens, mode="decode", seed=11),
                               attn(q, k, v, kv_lens=kv_lens, mode="prefill", seed=11), atol=1e-6, rtol=1e-6)


def test_split_kv_source_has_a_combine_kernel_and_plain_modules_do_not():
    attn = ag.compile(ag.AttentionSpec(mask_mod=masks.causal))
    assert "_attn_combine" not in attn.source
    source = attn.for_call(ag.runtime.variants.Variant(split_kv=True)).source
    assert "def _attn_combine(" in source and "window_lo = split * CHUNK" in source


def test_mode_is_checked():
    q, k, v = Case(1, 2, 2, 1, 8, 16, 16).tensors()
    with pytest.raises(ValueError, match="mode must be one of"):
        ag.compile(ag.AttentionSpec())(q, k, v, mode="fast")


# -- paged caches -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("name", ["causal", "alibi_learnable", "sigmoid_log_n", "learnable_sink"])
def test_paged_cache_equals_contiguous_and_reference(name, mode):
    k_pages, v_pages, table = paged_cache()
    q = torch.randn(3, 4, 2, 16, generator=torch.Generator().manual_seed(1))
    kv_lens = torch.tensor([56, 13, 1])
    spec = SPECS[name](4)
    check_paged(spec, q, k_pages, v_pages, table, kv_lens, mode)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_paged_cache_at_a_split_head_dim(mode):
    """Keys in two column parts (Dqk 40 = 32 + 16) read through pages, GQA-packed when decoding."""
    k_pages, v_pages, table = paged_cache(dim=40)
    q = torch.randn(3, 4, 2, 40, generator=torch.Generator().manual_seed(1))
    check_paged(SPECS["alibi_learnable"](4), q, k_pages, v_pages, table, torch.tensor([56, 13, 1]), mode)


def test_paged_cache_has_no_backward():
    k_pages, v_pages, table = paged_cache()
    q = torch.randn(3, 4, 1, 16, requires_grad=True)
    out = ag.compile(ag.AttentionSpec())(q, k_pages, v_pages, kv_lens=torch.tensor([9, 9, 9]), block_table=table)
    with pytest.raises(RuntimeError, match="paged KV cache is for inference"):
        out.sum().backward()


@pytest.mark.parametrize("change, message", [
    (lambda c: {**c, "kv_lens": None}, "needs kv_lens"),
    (lambda c: {**c, "block_table": c["block_table"][:2]}, r"integer tensor \[batch \(3\), max_pages\]"),
    (lambda c: {**c, "block_table": c["block_table"].float()}, "integer tensor"),
    (lambda c: {**c, "block_table": torch.full_like(c["block_table"], 20)}, r"pages outside 0..19"),
    (lambda c: {**c, "block_table": c["block_table"].index_fill(1, torch.tensor([1]), -1)}, r"pages outside 0..19"),
    (lambda c: {**c, "kv_lens": torch.tensor([57, 1, 1])}, r"between 0 and the cache length \(56\)"),
])
def test_bad_paged_calls(change, message):
    k_pages, v_pages, table = paged_cache()
    q = torch.randn(3, 4, 1, 16)
    call = change({"kv_lens": torch.tensor([9, 9, 9]), "block_table": table})
    with pytest.raises(ValueError, match=message):
        ag.compile(ag.AttentionSpec())(q, k_pages, v_pages, **call)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("padding", [-1, 20])
def test_a_block_table_may_hold_anything_past_kv_lens(padding, mode):
    """Entries past each batch entry's kv_lens (padding, as serving engines leave it) are neither checked
    nor read, though a tile of keys spans them (before: read, and a page -1's values made the output NaN)."""
    k_pages, v_pages, table = paged_cache()
    q = torch.randn(3, 4, 1, 16)
    kv_lens = torch.tensor([9, 16, 5])  # pages of 8 keys: the first 2, 2 and 1 of each row are read
    padded = table.clone()
    padded[:, 2:], padded[2, 1:] = padding, padding
    attn = ag.compile(ag.AttentionSpec())
    assert torch.equal(attn(q, k_pages, v_pages, kv_lens=kv_lens, block_table=padded, mode=mode),
                       attn(q, k_pages, v_pages, kv_lens=kv_lens, block_table=table, mode=mode))


# -- packed sequences ----------------------------------------------------------------------

def _packed(lengths_q, lengths_k, heads=4, kv_heads=2, qk_dim=16, v_dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()])
    q = torch.randn(int(cu_q[-1]), heads, qk_dim, generator=gen).requires_grad_()
    k = torch.randn(int(cu_k[-1]), kv_heads, qk_dim, generator=gen).requires_grad_()
    v = torch.randn(int(cu_k[-1]), kv_heads, v_dim, generator=gen).requires_grad_()
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("name", sorted(SPECS))
def test_packed_sequences_match_reference(name):
    q, k, v, cu_q, cu_k = _packed([17, 0, 40, 5], [17, 3, 40, 60])
    assert_matches_reference(SPECS[name](4), q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_packed_sequences_see_their_index_and_positions():
    table = torch.randn(3, 50)

    def per_sequence_bias(s, b, h, q_idx, kv_idx):
        return s + table[b, kv_idx] - 0.05 * q_idx
    spec = ag.AttentionSpec(score_mod=per_sequence_bias, mask_mod=masks.causal, stats=("lse", "col_sum"))
    q, k, v, cu_q, cu_k = _packed([20, 33, 9], [20, 50, 9], heads=2, kv_heads=1)
    assert_matches_reference(spec, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_packed_equals_padded_and_masked():
    lengths = [30, 7, 19]
    q, k, v, cu, _ = _packed(lengths, lengths, heads=2, kv_heads=2, v_dim=16)
    spec = ag.AttentionSpec(mask_mod=masks.causal)
    packed = ag.compile(spec)(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    longest = max(lengths)
    padded = [torch.zeros(len(lengths), 2, longest, 16) for _ in range(3)]
    for i, n in enumerate(lengths):
        for dense, t in zip(padded, (q, k, v)):
            dense[i, :, :n] = t[int(cu[i]):int(cu[i]) + n].detach().transpose(0, 1)
    lens = torch.tensor(lengths)
    out = ag.compile(ag.AttentionSpec(mask_mod=masks.causal & masks.padding(lens)))(*padded)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(packed[int(cu[i]):int(cu[i]) + n], out[i, :, :n].transpose(0, 1),
                                   atol=1e-5, rtol=1e-5)


def test_packed_rows_expectations_equal_a_batch_of_the_sequences():
    """Packed sequences of equal length are a batch: b is the sequence, q_idx the position within it."""
    lengths = [21, 21, 21]
    q, k, v, cu, _ = _packed(lengths, lengths, heads=2, kv_heads=1, v_dim=16)
    attn = ag.compile(ag.AttentionSpec(mask_mod=masks.causal, stats=("lse", DRIFT)))
    _, packed = attn(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, return_stats=True)
    batch = [t.detach().unflatten(0, (3, 21)).transpose(1, 2) for t in (q, k, v)]
    _, dense = attn(*batch, return_stats=True)
    torch.testing.assert_close(packed.drift, dense.drift.transpose(0, 1).flatten(1), atol=1e-5, rtol=1e-5)


def _nested(packed: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Packed (tokens, heads, dim) sequences as a jagged nested tensor [batch, j, heads, dim], a leaf (its
    transpose(1, 2) is attention's layout)."""
    pieces = [packed[int(cu[i]):int(cu[i + 1])].detach() for i in range(len(cu) - 1)]
    return torch.nested.nested_tensor(pieces, layout=torch.jagged, requires_grad=True)


@pytest.mark.parametrize("lengths_q, lengths_k", [([20, 33, 9], [20, 33, 9]), ([5, 1, 12], [20, 7, 3])])
def test_jagged_nested_tensors_are_packed_sequences(lengths_q, lengths_k):
    """q, k, v as jagged nested tensors [B, H, j, D] (SDPA's layout): out is one too, with the packed call's
    values, and gradients reach the nested leaves, as the packed call's (itself checked against the
    reference); statistics come back packed."""
    table = torch.randn(3, 40)
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + table[b, kv_idx] - 0.05 * q_idx,
                            mask_mod=masks.causal)
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, heads=4, kv_heads=2, v_dim=16)
    leaves = [_nested(t, cu) for t, cu in ((q, cu_q), (k, cu_k), (v, cu_k))]
    nested = [leaf.transpose(1, 2) for leaf in leaves]
    attn = ag.compile(spec)
    out, stats = attn(*nested, return_stats=True)
    expected, expected_stats = attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_stats=True)
    assert out.is_nested and out.shape[:2] == (3, 4) and out.shape[3] == 16
    torch.testing.assert_close(out.transpose(1, 2).values(), expected, rtol=0, atol=0)
    torch.testing.assert_close(stats.lse, expected_stats.lse, rtol=0, atol=0)
    grad = torch.randn_like(expected)
    out.transpose(1, 2).values().backward(grad)
    expected.backward(grad)
    for leaf, dense in zip(leaves, (q, k, v)):
        torch.testing.assert_close(leaf.grad.values(), dense.grad, rtol=0, atol=0)
    assert_matches_reference(spec, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    torch.testing.assert_close(ag.attention(*nested, spec.score_mod, spec.mask_mod).transpose(1, 2).values(),
                               expected, rtol=0, atol=0)


def test_bad_nested_calls():
    q, k, v, cu, _ = _packed([5, 4], [5, 4])
    nested = [_nested(t, cu).transpose(1, 2) for t in (q, k, v)]
    attn = ag.compile(ag.AttentionSpec())
    with pytest.raises(ValueError, match=r"must each be a jagged nested tensor .* v is a dense tensor of shape"):
        attn(nested[0], nested[1], v)
    with pytest.raises(ValueError, match="nested tensors carry their sequence lengths"):
        attn(*nested, cu_seqlens_q=cu, cu_seqlens_k=cu)
    with pytest.raises(ValueError, match=r"k and v must hold sequences of the same lengths, got offsets \[0, 5, 9\] "
                                         r"and \[0, 4, 9\]"):
        attn(nested[0], nested[1], _nested(v, torch.tensor([0, 4, 9])).transpose(1, 2))
    with pytest.raises(ValueError, match="a jagged nested tensor of shape"):  # ragged in the heads, not the length
        attn(nested[0].transpose(1, 2), *nested[1:])


def test_packed_plan_skips_tiles_between_sequences():
    cu = torch.arange(0, 513, 64)  # eight sequences of 64 tokens
    stats = ag.compile(ag.AttentionSpec(mask_mod=masks.causal)).block_stats(
        512, 512, heads=1, block_m=64, block_n=64, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert stats == {"total": 64, "empty": 56, "full": 0, "partial": 8}  # the diagonal tiles only


def test_decoding_visits_only_the_cache_it_holds():
    stats = ag.compile(ag.AttentionSpec(mask_mod=masks.causal)).block_stats(
        1, 4096, batch=2, block_m=16, block_n=64, kv_lens=torch.tensor([4096, 1000]))
    assert stats["total"] == 2 * 64 and stats["total"] - stats["empty"] == 64 + 16


# -- bad calls ----------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (dict(kv_lens=torch.tensor([3.0, 4.0])), "kv_lens must be an int or a 1-d integer tensor"),
    (dict(kv_lens=torch.tensor([3])), r"one entry per batch entry \(2\)"),
    (dict(kv_lens=torch.tensor([3, 41])), r"between 0 and the cache length \(40\)"),
    (dict(q_offset=torch.ones(2, 2, dtype=torch.long)), "q_offset must be an int or a 1-d integer tensor"),
    (dict(cu_seqlens_q=torch.tensor([0, 3])), "need both cu_seqlens_q and cu_seqlens_k"),
])
def test_bad_cache_and_packing_arguments(call, message):
    q, k, v = Case(2, 2, 2, 3, 40, 16, 16).tensors()
    with pytest.raises(ValueError, match=message):
        ag.compile(ag.AttentionSpec())(q, k, v, **call)


@pytest.mark.parametrize("cu_q, cu_k, message", [
    ([0, 5, 9], [0, 5, 9], "must have 3 dimensions"),
])
def test_packed_calls_need_three_dimensional_inputs(cu_q, cu_k, message):
    q, k, v = Case(1, 2, 2, 9, 9, 16, 16).tensors()
    with pytest.raises(ValueError, match=message):
        ag.compile(ag.AttentionSpec())(q, k, v, cu_seqlens_q=torch.tensor(cu_q), cu_seqlens_k=torch.tensor(cu_k))


@pytest.mark.parametrize("cu_q, message", [
    ([1, 5, 9], "must start at 0"), ([0, 6, 5, 9], "never decrease"), ([0, 5, 8], r"end at the number of packed tokens \(9\)"),
])
def test_bad_cumulative_lengths(cu_q, message):
    q, k, v, _, cu_k = _packed([5, 4], [5, 4])
    with pytest.raises(ValueError, match=message):
        ag.compile(ag.AttentionSpec())(q, k, v, cu_seqlens_q=torch.tensor(cu_q),
                                       cu_seqlens_k=cu_k if len(cu_q) == 3 else torch.tensor([0, 1, 5, 9]))


def test_both_cumulative_lengths_are_checked_with_one_read(monkeypatch):
    """Each read of a tensor's values waits for a GPU: cu_seqlens_q and cu_seqlens_k are checked by one."""
    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    positions = packed_positions(torch.tensor([0, 5, 9]), torch.tensor([0, 2, 6]), 9, 6)
    assert len(reads) == 1
    assert positions["len_k"].tolist() == [2, 4]
    with pytest.raises(ValueError, match=r"cu_seqlens_k must start at 0.*\(6\), got \[0, 2, 7\]"):
        packed_positions(torch.tensor([0, 5, 9]), torch.tensor([0, 2, 7]), 9, 6)


def test_the_layers_of_a_decoding_step_read_kv_lens_once(monkeypatch):
    """Each read of kv_lens's values (to check them) waits for a GPU: the calls of every layer of one step,
    which share the tensor, read it once; an in-place update (the next step) is read again and checked
    (before: one read per call, so one wait per layer)."""
    attn = ag.compile(ag.AttentionSpec(mask_mod=masks.causal))
    q, k, v = (torch.randn(2, 2, n, 16, generator=torch.Generator().manual_seed(n)) for n in (1, 24, 24))
    first = attn(q, k, v, kv_lens=torch.tensor([10, 20]))  # builds and imports the kernels
    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    lens = torch.tensor([10, 20])
    for _ in range(4):  # four layers
        assert torch.equal(attn(q, k, v, kv_lens=lens), first)
    assert len(reads) == 1
    lens += 1
    attn(q, k, v, kv_lens=lens)
    assert len(reads) == 2
    lens += 4
    with pytest.raises(ValueError, match=r"kv_lens must be between 0 and the cache length \(24\), got \[15, 25\]"):
        attn(q, k, v, kv_lens=lens)


CACHE_MAPS = (ag.stats.col_sum(), ag.stats.col_sum(reduce_heads=True, name="per_kv_head"),
              ag.stats.pooled(4, 8, "mean", name="pooled"), ag.stats.pooled(3, 5, "sum", name="coarse"),
              ag.stats.pooled(2, 16, "max", name="peak"))


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("q_len, q_offset", [(1, None), (5, None), (5, [20, 0])], ids=["1", "5", "5_offsets"])
def test_maps_over_a_kv_cache(q_len, q_offset, mode):
    """Column sums and pooled maps of a call on a KV cache (what H2O-style eviction accumulates): columns
    are the cache's positions, 0 past each entry's keys, "mean" over each block's positions in the cache;
    equal to the maps of a dense call masked to each entry's keys and positions (the reference of both),
    their gradients too (but the pooled "max", forward-only)."""
    lens, offsets = torch.tensor([41, 17]), torch.tensor(q_offset) if q_offset else None
    spec = ag.AttentionSpec(mask_mod=masks.causal, stats=CACHE_MAPS)
    q, k, v = Case(2, 4, 2, 41, 41, 16, 16, seed=3).tensors()
    q = q[:, :, :q_len]
    assert_matches_reference(spec, q, k, v, kv_lens=lens, q_offset=offsets, mode=mode)
    shift = lens - q_len if offsets is None else offsets
    dense = dataclasses.replace(spec, mask_mod=lambda b, h, q_idx, kv_idx: (kv_idx < lens[b])
                                & (kv_idx <= q_idx + shift[b]))
    _, stats = ag.compile(spec)(q, k, v, kv_lens=lens, q_offset=offsets, mode=mode, return_stats=True)
    _, expected = ag.reference.attention(q.double(), k.double(), v.double(), dense, return_stats=True)
    for stat in CACHE_MAPS:
        torch.testing.assert_close(getattr(stats, stat.name), getattr(expected, stat.name).float())
    assert torch.all(stats.col_sum[1, :, 17:] == 0) and torch.all(stats.col_sum[1, :, :17].sum(-1) > 0)


def test_maps_over_a_paged_cache():
    k_pages, v_pages, table = paged_cache()
    q = torch.randn(3, 4, 2, 16, generator=torch.Generator().manual_seed(1))
    spec = ag.AttentionSpec(mask_mod=masks.causal, stats=CACHE_MAPS)
    for mode in ("prefill", "decode"):
        assert_matches_reference(spec, q, k_pages, v_pages, kv_lens=torch.tensor([56, 13, 1]), block_table=table,
                                 mode=mode)


# -- dropout ------------------------------------------------------------------------------

DROPOUT_SPECS = {
    "softmax_causal": lambda h: ag.AttentionSpec(mask_mod=masks.causal, stats=("lse", "entropy")),
    "alibi_learnable": SPECS["alibi_learnable"],
    "sigmoid": lambda h: ag.AttentionSpec(normalization=ag.norms.Sigmoid(bias=-1.0)),
    "affine": DECODE_SPECS["affine"],
    "learnable_sink": SPECS["learnable_sink"],
    "sparsemax": lambda h: ag.AttentionSpec(normalization=ag.norms.Sparsemax()),  # fuzzer, seed 14
    "entmax": lambda h: ag.AttentionSpec(normalization=ag.norms.Entmax(1.5), mask_mod=masks.causal),
    "entmax_learnable": SPECS["entmax_learnable"],
}


@pytest.mark.parametrize("name", sorted(DROPOUT_SPECS))
def test_dropout_backward_matches_a_reference_with_the_same_mask(name):
    q, k, v = Case(2, 4, 2, 33, 40, 16, 8, seed=5).tensors()
    assert_matches_reference(DROPOUT_SPECS[name](4), q, k, v, dropout_p=0.3, seed=11)


def test_dropout_in_the_spec_and_with_packed_sequences():
    spec = ag.AttentionSpec(mask_mod=masks.causal, dropout_p=0.2)
    q, k, v = Case(1, 2, 2, 20, 20, 16, 16).tensors()
    assert_matches_reference(spec, q, k, v)  # the spec's rate, the toolkit's seed
    out = ag.compile(spec)(q, k, v, dropout_p=0.0)
    torch.testing.assert_close(out, ag.compile(ag.AttentionSpec(mask_mod=masks.causal))(q, k, v))


def test_dropout_masks_are_deterministic_unbiased_and_differ_by_seed_and_head():
    attn = ag.compile(ag.AttentionSpec())
    keep = attn.dropout_keep(2, 3, 64, 64, 0.25, seed=123)
    fraction, n = float(keep.float().mean()), keep.numel()
    assert abs(fraction - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5  # within four standard deviations
    assert torch.equal(keep, attn.dropout_keep(2, 3, 64, 64, 0.25, seed=123))
    assert not torch.equal(keep, attn.dropout_keep(2, 3, 64, 64, 0.25, seed=124))
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    q, k, v = Case(1, 1, 1, 8, 16, 16, 16).tensors(requires_grad=False)
    mean = torch.stack([attn(q, k, v, dropout_p=0.25, seed=s) for s in range(64)]).mean(0)
    plain = attn(q, k, v)
    spread = torch.stack([attn(q, k, v, dropout_p=0.25, seed=s) for s in range(64, 80)]).std(0)
    assert ((mean - plain).abs() < 4 * spread / 64 ** 0.5 + 1e-6).all()  # E[dropped output] = output


def test_the_generator_is_philox_4x32_10():
    """Random123's known answer: key (0, 0), counter 0 gives 0x6627e8d5 first; the mask keeps a weight
    when the top 24 bits, as a fraction, are at least the rate."""
    attn = ag.compile(ag.AttentionSpec())
    first = 0x6627E8D5 >> 8
    assert attn.dropout_keep(1, 1, 1, 1, (first - 0.5) / 2**24, seed=0).item()
    assert not attn.dropout_keep(1, 1, 1, 1, (first + 0.5) / 2**24, seed=0).item()


@pytest.mark.parametrize("call, message", [
    (dict(dropout_p=1.0), r"dropout_p must be a number in \[0, 1\)"),
    (dict(dropout_p=-0.1), r"dropout_p must be a number in \[0, 1\)"),
    (dict(dropout_p=0.1, seed=1.5), "seed must be an int"),
])
def test_bad_dropout_arguments(call, message):
    q, k, v = Case(1, 1, 1, 4, 4, 16, 16).tensors()
    with pytest.raises(ValueError, match=message):
        ag.compile(ag.AttentionSpec())(q, k, v, **call)
    with pytest.raises(ag.SpecError, match="dropout_p must be"):
        ag.AttentionSpec(dropout_p=1.5)


# -- torch.inference_mode -----------------------------------------------------------------


def test_every_kind_of_call_runs_on_inference_tensors():
    """Tensors made under torch.inference_mode (q, k, v, the call's tensors and the spec's captured ones)
    give what the same values give under no_grad, bit for bit. Before: a captured integer table read at an
    index (``bias[h, buckets[q_idx, kv_idx]]``) raised 'Inference tensors do not track version counter'
    (its checked extremes were kept by version)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def calls(make):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (make(torch.randn(2, h, 24, 16, generator=gen)) for h in (4, 2, 2))
        buckets, table = make(torch.randint(0, 5, (24, 24), generator=gen)), make(torch.randn(4, 5, generator=gen))
        doc_ids, lens = make(torch.tensor([[0] * 10 + [1] * 14, [0] * 20 + [1] * 4])), make(torch.tensor([17, 24]))
        pages = [make(torch.randn(6, 2, 8, 16, generator=gen)) for _ in range(2)]
        cu = make(torch.tensor([0, 9, 24], dtype=torch.int32))
        bucketed = ag.compile(ag.AttentionSpec(
            score_mod=lambda s, b, h, q_idx, kv_idx: s + table[h, buckets[q_idx, kv_idx]],
            mask_mod=ag.masks.document(doc_ids), stats=("lse", "max")))
        causal = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal))
        flex = create_block_mask(ag.masks.causal, None, None, 24, 24, device="cpu", BLOCK_SIZE=8)
        out, stats = bucketed(q, k, v, return_stats=True)
        diagonal = make(torch.eye(3, dtype=torch.bool)[None, None])  # blocks of 8 x 8 tokens
        return [out, stats.lse, stats.max, bucketed(q, k, v, block_mask=diagonal),
                causal(q[:, :, :2], k, v, kv_lens=lens, mode="decode"), ag.attention(q, k, v, block_mask=flex),
                causal(q[:, :, :1], *pages, block_table=make(torch.tensor([[0, 1, 2], [3, 4, 5]])), kv_lens=lens),
                causal(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_seqlens_q=cu,
                       cu_seqlens_k=cu)]

    with torch.no_grad():
        expected = calls(lambda t: t)
    with torch.inference_mode():
        got = calls(lambda t: t.clone())
    assert all(t.is_inference() for t in torch.utils._pytree.tree_leaves(got))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
