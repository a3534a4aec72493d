"""Every kernel a spec launches compiles for Hopper (sm_90) and Ampere (sm_80), without a GPU.

Triton's interpreter accepts code the real compiler rejects (and vice versa),
so the CPU suite alone does not show that the generated module builds for a
GPU. These tests run Triton's NVIDIA back end ahead of time on CPU tensors.
"""

import pytest
import torch

import attngen as ag
from attngen.testing.gpu_compile import compile_for_gpu
from attngen.runtime.variants import Variant
from variants import VARIANTS, Case

CASE = Case(2, 4, 2, 200, 180, 64, 64)
H100_SHARED_MEMORY = 227 * 1024
A100_SHARED_MEMORY = 163 * 1024
SLOPES = torch.rand(4, requires_grad=True)
DOC_IDS = torch.randint(0, 4, (2, 200), generator=torch.Generator().manual_seed(0)).sort().values
# learnable tensors read per head, per query, per key and per relative position: gradients summed per row in
# the dQ kernel, per key in the dK/dV kernel and atomically
PER_HEAD, PER_QUERY, PER_KEY, RELATIVE = (torch.rand(shape, requires_grad=True)
                                          for shape in ((4,), (2, 200), (2, 180), (4, 399)))


def _learnable(score, b, h, q_idx, kv_idx):
    return score * PER_HEAD[h] * PER_QUERY[b, q_idx] + PER_KEY[b, kv_idx] + RELATIVE[h, q_idx - kv_idx + 199]


def _tensors(dtype, qk_dim=64, v_dim=64, lengths=(200, 180)):
    lq, lk = lengths
    return (torch.randn(2, 4, lq, qk_dim, dtype=dtype), torch.randn(2, 2, lk, qk_dim, dtype=dtype),
            torch.randn(2, 2, lk, v_dim, dtype=dtype))


def _extra_specs():
    return {
        "learnable_sink": ag.AttentionSpec(normalization=ag.norms.Softmax(sink=torch.zeros(4, requires_grad=True))),
        "sigmoid": ag.AttentionSpec(normalization=ag.norms.Sigmoid(bias="-log n"), mask_mod=ag.masks.causal),
        "relu2_unmasked": ag.AttentionSpec(normalization=ag.norms.ReLU(power=2, normalize="unmasked"),
                                           mask_mod=ag.masks.sliding_window(40)),
        "scalable": ag.AttentionSpec(normalization=ag.norms.ScalableSoftmax(s=0.4, count="unmasked")),
        "affine": ag.AttentionSpec(normalization=ag.norms.AffineSoftmax(alpha=torch.ones(4, requires_grad=True),
                                                                        beta=0.01)),
        "sparsemax": ag.AttentionSpec(normalization=ag.norms.Sparsemax(), mask_mod=ag.masks.causal,
                                      stats=("support", "entropy")),
        "stick_breaking": ag.AttentionSpec(normalization=ag.norms.StickBreaking(), mask_mod=ag.masks.causal,
                                           score_mod=lambda s, b, h, q_idx, kv_idx: s + SLOPES[h], stats=("col_sum",)),
        "differential": ag.AttentionSpec(differential=torch.full((4,), 0.5, requires_grad=True),
                                         score_mod=lambda s, b, h, q_idx, kv_idx: s * torch.rand(4)[h],
                                         mask_mod=ag.masks.causal),
        "entmax_1_3": ag.AttentionSpec(normalization=ag.norms.Entmax(1.3)),
        "entmax_learnable": ag.AttentionSpec(normalization=ag.norms.Entmax(torch.full((4,), 1.5, requires_grad=True)),
                                             mask_mod=ag.masks.causal, stats=("col_sum", "entropy", ag.stats.expectation(
                                                 lambda s, b, h, q, k: torch.tanh(s) * (q - k), "drift"))),
        "softpick": ag.AttentionSpec(normalization=ag.norms.Softpick(), mask_mod=ag.masks.causal),
        "normalized": ag.AttentionSpec(normalization=ag.norms.Normalized(lambda s: s * s), mask_mod=ag.masks.causal,
                                       stats=("entropy",)),
        "signed_softmax": ag.AttentionSpec(normalization=ag.norms.SignedSoftmax(), mask_mod=ag.masks.causal,
                                           stats=(ag.stats.expectation(lambda s, b, h, q, k: s * s, "second_moment"),)),
        "softpick_expectation": ag.AttentionSpec(normalization=ag.norms.Softpick(), mask_mod=ag.masks.causal,
                                                 stats=(ag.stats.expectation(lambda s, b, h, q, k: (q - k) * 1.0,
                                                                             "distance"), "max")),
        "learnable_captures": ag.AttentionSpec(score_mod=_learnable, mask_mod=ag.masks.causal),
        "top_k": ag.AttentionSpec(normalization=ag.norms.Softmax(sink=torch.zeros(4, requires_grad=True)), top_k=32,
                                  mask_mod=ag.masks.causal, stats=("lse", "max", "entropy")),
        "stick_breaking_expectation": ag.AttentionSpec(
            normalization=ag.norms.StickBreaking(), mask_mod=ag.masks.causal, stats=(ag.stats.expectation(
                lambda s, b, h, q, k: (q - k) * 1.0, "distance"), "max")),
        "stick_breaking_entropy": ag.AttentionSpec(  # summed from the shares, beside a traced expectation
            normalization=ag.norms.StickBreaking(), mask_mod=ag.masks.causal, stats=("entropy", ag.stats.expectation(
                lambda s, b, h, q, k: torch.tanh(s) * (q - k), "drift"))),
        "top_k_entmax_learnable": ag.AttentionSpec(
            normalization=ag.norms.Entmax(torch.full((4,), 1.5, requires_grad=True)), top_k=16,
            mask_mod=ag.masks.causal, stats=("max", "col_sum")),
        "top_k_stick_breaking_documents": ag.AttentionSpec(  # listed tiles, walked last first by _topk_floor too
            normalization=ag.norms.StickBreaking(), top_k=8, mask_mod=ag.masks.document(DOC_IDS), stats=("max",)),
        "differential_learnable_captures": ag.AttentionSpec(score_mod=_learnable, differential=0.5),
        "sigmoid_max_learnable_captures": ag.AttentionSpec(  # the max's gradient through logit_fn_backward
            normalization=ag.norms.Sigmoid(), score_mod=_learnable, mask_mod=ag.masks.causal, stats=("max",)),
        "normalized_expectation": ag.AttentionSpec(  # and an expectation's, with the normalizer's row term
            normalization=ag.norms.Normalized(lambda s: s * s), score_mod=lambda s, b, h, q_idx, kv_idx: s + SLOPES[h],
            mask_mod=ag.masks.causal, stats=(ag.stats.expectation(lambda s, b, h, q, k: torch.tanh(s) * (q - k), "drift"),
                                             "max")),
        "all_stats": ag.AttentionSpec(mask_mod=ag.masks.causal, stats=(
            "lse", "max", "entropy", ag.stats.expectation(lambda s, b, h, q, k: s * s, "second_moment"),
            "col_sum", ag.stats.pooled(16, 16, "mean", name="mean_map"),
            ag.stats.pooled(16, 32, "max", name="max_map"))),
    }


def _check(spec, dtype=torch.bfloat16, arch=90, qk_dim=64, v_dim=64, lengths=(200, 180), **tiles):
    """Builds the kernels of a forward and of a backward with the statistics' gradients."""
    kernels = compile_for_gpu(ag.compile(spec), *_tensors(dtype, qk_dim, v_dim, lengths), arch=arch, tiles=tiles,
                              stat_grads=True)
    names = {k.name for k in kernels}
    assert names & {"_attn_bwd_dq", "_diff_bwd_dq", "_stick_bwd"} and \
        names & {"_attn_fwd", "_threshold_fwd", "_stick_fwd"}, names
    for kernel in kernels:
        assert 0 <= kernel.shared_bytes <= H100_SHARED_MEMORY, kernel
    return kernels


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_variant_compiles_for_sm90(variant):
    _check(variant.spec(variant.captures(CASE, torch.Generator().manual_seed(0))))


@pytest.mark.parametrize("name", sorted(_extra_specs()))
def test_normalizations_and_stats_compile_for_sm90(name):
    _check(_extra_specs()[name])


@pytest.mark.parametrize("name", sorted(_extra_specs()))
def test_whole_tiles_compile_for_sm90(name):
    """Lengths that are multiples of the tiles (64 x 64 at head dim 64) build the kernels' EVEN_M / EVEN_N
    specializations, which the lengths above (200, 180) never reach."""
    _check(_extra_specs()[name], lengths=(128, 64))


@pytest.mark.parametrize("spec", [ag.AttentionSpec(), ag.AttentionSpec(mask_mod=ag.masks.causal)],
                         ids=["plain", "causal"])
def test_whole_tiles_drop_their_bounds_checks(spec):
    """When Lq and Lk are multiples of the tiles, no tile has rows or keys past the ends: the kernels leave
    out the per-score bounds selects and the load masks. Against 272 (not a multiple of 64, but of 16,
    so Triton specializes the lengths' divisibility the same way), each loop kernel is shorter (it was
    9% at 256 for the plain forward, 16-19% for its backward, 17-24% for every causal kernel)."""
    attn = ag.compile(spec)
    instructions = {length: {k.name: k.instructions for k in compile_for_gpu(
        attn, *(torch.randn(1, 2, length, 64, dtype=torch.bfloat16) for _ in range(3)))} for length in (256, 272)}
    for kernel in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        assert instructions[256][kernel] < 0.95 * instructions[272][kernel], (kernel, instructions)


def test_the_softmax_of_the_products_folds_the_scale_into_exp2():
    """softmax(q k^T * scale) takes its row max from the unscaled products (scale > 0) and its weights as
    exp2(dot * scale log2 e - m log2 e), one multiply-add per score. A score_mod (here s * 1.5) needs the
    scaled score first. Per 64 x 64 tile of 4 warps (32 scores a thread) that is 56 / 96 / 96
    instructions more in the forward / dK/dV / dQ kernels; before the fold 32 / 64 / 64."""
    tensors = [torch.randn(1, 2, 256, 64, dtype=torch.bfloat16) for _ in range(3)]
    plain, modded = ({k.name: k.instructions for k in compile_for_gpu(ag.compile(spec), *tensors)} for spec in (
        ag.AttentionSpec(), ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s * 1.5)))
    for kernel, fewer in (("_attn_fwd", 48), ("_attn_bwd_dkdv", 80), ("_attn_bwd_dq", 80)):
        assert modded[kernel] - plain[kernel] >= fewer, (kernel, plain, modded)


def test_data_dependent_masks_run_their_whole_tiles_without_the_mask():
    """A document mask's kernels loop over listed tiles: those kept whole by one loop, those with masked
    positions by another, so a whole tile runs the unmasked code of plain attention. With one loop that
    checked each tile's flag, the loop bodies were 2.4-2.6 times plain attention's (sm_90, D=64: forward
    841 against 351 instructions, dK/dV 920 against 379, dQ 778 against 299)."""
    tensors = [torch.randn(1, 2, 256, 64, dtype=torch.bfloat16) for _ in range(3)]
    doc = (torch.arange(256) * 4 // 256)[None]
    plain, document = ({k.name: min(k.loops) for k in compile_for_gpu(ag.compile(spec), *tensors) if k.loops}
                       for spec in (ag.AttentionSpec(), ag.AttentionSpec(mask_mod=ag.masks.document(doc))))
    for kernel in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        assert document[kernel] < 1.1 * plain[kernel], (kernel, plain, document)


def test_affine_softmax_takes_the_launchers_value_sums_for_tiles_kept_whole():
    """Affine softmax adds beta times the sum of the kept values. A tile kept whole adds the column sums of
    its values that the launcher computes per tile (one vector load), where reducing v across the tile's
    rows took as many instructions as the rest of the loop (sm_90, D=64: 1344 against plain softmax's 936,
    now 1136) and kept its loads from pipelining (32.5 KB of shared memory, plain softmax's 40)."""
    tensors = [torch.randn(1, 2, 256, 64, dtype=torch.bfloat16) for _ in range(3)]
    plain, affine = ({k.name: k for k in compile_for_gpu(ag.compile(spec), *tensors, backward=False)}["_attn_fwd"]
                     for spec in (ag.AttentionSpec(),
                                  ag.AttentionSpec(normalization=ag.norms.AffineSoftmax(alpha=0.9, beta=0.01))))
    assert affine.instructions < 1.3 * plain.instructions, (plain, affine)
    assert affine.shared_bytes == plain.shared_bytes, (plain, affine)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes_and_head_dims(dtype):
    _check(ag.AttentionSpec(mask_mod=ag.masks.causal), dtype=dtype, qk_dim=128, v_dim=96)


def test_ampere():
    _check(ag.AttentionSpec(mask_mod=ag.masks.sliding_window(64)), arch=80)


@pytest.mark.parametrize("tiles, dims", [
    ({"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}, (128, 128)),
    ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, (128, 128)),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}, (128, 128)),
    ({"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}, (576, 512)),
    ({"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}, (576, 512)),
], ids=["128x128x2", "128x64x3", "64x128x3", "mla_16x32x1", "mla_32x32x1"])
def test_the_shared_memory_estimate_bounds_large_configs(tiles, dims):
    """The autotuner prunes by an estimate; it must not under-count near the limit: large tiles at head
    dim 128, and at MLA's head dims the small ones whose products are mma.sync (one more staged tile)."""
    from attngen.runtime.autotune import shared_memory_bytes

    q, k, v = _tensors(torch.bfloat16, *dims)
    for kernel in compile_for_gpu(ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal)), q, k, v, tiles=tiles):
        if kernel.name in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"):
            assert kernel.shared_bytes <= shared_memory_bytes(tiles, *dims, 2, kernel.phase), kernel


@pytest.mark.parametrize("name", ["causal", "all_stats", "entmax_learnable", "stick_breaking", "differential",
                                  "softpick"])
def test_mla_head_dims_build_within_an_a100_at_the_default_tiles(name):
    """MLA's head dims (Dqk 576 = 512 + 64 rotary, q and k in those two parts; Dv 512): the default 16 x 16 tiles keep
    every kernel of each family within an A100's shared memory (at 64 x 32 the forward needed 224 KB, the
    backward 288 KB); 8 warps keep the forward free of spills but entmax's (88 B with a per-head alpha)."""
    spec = {"causal": ag.AttentionSpec(mask_mod=ag.masks.causal), **_extra_specs()}[name]
    q, k, v = _tensors(torch.bfloat16, 576, 512)
    for kernel in compile_for_gpu(ag.compile(spec), q, k[:, :1], v[:, :1], stat_grads=True):
        assert kernel.shared_bytes <= A100_SHARED_MEMORY, kernel
        assert kernel.phase == "backward" or name == "entmax_learnable" or kernel.spill_bytes == 0, kernel


def test_head_dims_between_powers_of_two_split_q_and_k():
    """q and k of head dim 192 (MLA's training form) as 128 + 64 columns, 576 (its absorbed decoding) as
    512 + 64. Measured when they padded to 256 / 1024: at 192 / 128 (whole tiles, no GQA) the forward took
    80 KB of shared memory and dK/dV spilled 264 B (Triton 3.6: 184 B; split, 40 B there and none in 3.9);
    at 576 / 512 with 64 x 16 tiles the forward took 176 KB (over an A100)."""
    attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal))
    q, k, v = (torch.randn(2, 4, 256, dim, dtype=torch.bfloat16) for dim in (192, 192, 128))  # whole tiles, no GQA
    kernels = {kernel.name: kernel for kernel in compile_for_gpu(attn, q, k, v)}
    assert kernels["_attn_fwd"].shared_bytes <= 64 * 1024, kernels["_attn_fwd"]
    assert all(kernel.spill_bytes <= 40 for kernel in kernels.values()), kernels
    [forward] = [kernel for kernel in compile_for_gpu(attn, *_tensors(torch.bfloat16, 576, 512), backward=False,
                                                      tiles={"BLOCK_M": 64, "BLOCK_N": 16})]
    assert forward.shared_bytes <= A100_SHARED_MEMORY and forward.wgmma > 0, forward


def _softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


@pytest.mark.parametrize("tiles", [{}, {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}],
                         ids=["default", "128x32"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("spec", [ag.AttentionSpec(score_mod=_softcap, mask_mod=ag.masks.causal),
                                  ag.AttentionSpec(normalization=ag.norms.Sigmoid(bias="-log n")),
                                  ag.AttentionSpec(mask_mod=ag.masks.document(DOC_IDS))],
                         ids=["softcap_causal", "sigmoid", "document"])
def test_every_dot_is_a_warpgroup_mma(spec, dim, tiles):
    """Speed hazards visible before any GPU run. On sm_90 a dot that Triton lowers to the synchronous
    warp MMA instead of wgmma (a transposed register tile, or fewer than 64 rows per warpgroup) runs
    at a fraction of the tensor-core rate (spills: the next test)."""
    for kernel in compile_for_gpu(ag.compile(spec), *_tensors(torch.bfloat16, dim, dim), tiles=tiles):
        if kernel.name in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv"):
            assert kernel.wgmma > 0 and kernel.mma_sync == 0, kernel


@pytest.mark.parametrize("dim", [64, 128])
def test_the_default_tiles_spill_no_registers_over_whole_tiles(dim):
    """Spilled registers go through local memory. Without GQA, over lengths that are multiples of the tiles,
    no kernel spills. The dK/dV kernel does elsewhere: 104-208 B per thread over ragged lengths (200 queries,
    180 keys), some of it inside its loop, and 136 B with GQA 2:1 at D = 128 (8 warps: 0-16 B, but longer
    loop bodies at D = 128; left for a GPU to time, as the autotuner does)."""
    spec = ag.AttentionSpec(score_mod=_softcap, mask_mod=ag.masks.causal)
    q, k, v = (torch.randn(2, 4, 256, dim, dtype=torch.bfloat16) for _ in range(3))
    for kernel in compile_for_gpu(ag.compile(spec), q, k, v):
        assert kernel.spill_bytes == 0, kernel


def test_user_block_masks_and_summaries_compile():
    doc_ids = torch.randint(0, 3, (2, 200)).sort().values
    _check(ag.AttentionSpec(mask_mod=ag.masks.document(doc_ids) & ag.masks.prefix_lm(torch.tensor([3, 9]))))
    kernels = compile_for_gpu(ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal)).with_block_mask((64, 128)),
                              *_tensors(torch.bfloat16))
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"} <= {k.name for k in kernels}


def test_data_dependent_masks_pipeline_their_loads():
    """A document mask has no closed-form loop range: its kernels visit the live tiles a first kernel
    listed, with no branch around the K/V (or Q/dO) loads, so Triton prefetches them. Shared memory
    that grows with num_stages shows the prefetch buffers; it stayed flat while each tile was
    checked in the loop and wrapped in an ``if``."""
    doc_ids = torch.randint(0, 4, (2, 200)).sort().values
    attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.document(doc_ids)))
    loops = ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")
    shared = {stages: {k.name: k.shared_bytes for k in compile_for_gpu(attn, *_tensors(torch.bfloat16),
                                                                        tiles={"num_stages": stages})}
              for stages in (2, 3)}
    assert {"_kv_tile_list", "_q_tile_list"} <= set(shared[2])
    for name in loops:
        assert shared[3][name] > shared[2][name], (name, shared)

def test_gqa_packed_decoding_pipelines_a_data_dependent_mask():
    """Split-KV decoding of a mask with one plan for every head (32-key blocks chosen per batch entry)
    packs the query heads of a kv head into one program's rows; it loops over their tile list, so its
    shared memory grows with num_stages (it stayed flat while each tile was checked in the loop)."""
    chosen = torch.rand(2, 10, generator=torch.Generator().manual_seed(1)) > 0.5
    spec = ag.AttentionSpec(mask_mod=lambda b, h, q_idx, kv_idx: chosen[b, kv_idx // 32])
    attn = ag.compile(spec).for_call(Variant(cache=True, split_kv=True))
    assert "GQA packing" in attn.source
    q, k, v = (torch.randn(2, 4, 5, 64, dtype=torch.bfloat16), torch.randn(2, 2, 300, 64, dtype=torch.bfloat16),
               torch.randn(2, 2, 300, 64, dtype=torch.bfloat16))
    shared = {stages: {k.name: k.shared_bytes for k in compile_for_gpu(attn, q, k, v, tiles={"num_stages": stages},
                                                                        backward=False)}
              for stages in (2, 3)}
    assert "_kv_tile_list" in shared[2]
    assert shared[3]["_attn_fwd"] > shared[2]["_attn_fwd"], shared


@pytest.mark.parametrize("variant", [Variant(split_kv=True), Variant(cache=True, split_kv=True, paged=True),
                                     Variant(packed=True), Variant(cache=True), Variant(dropout=True),
                                     Variant(block_size=(16, 64), cache=True, split_kv=True)],
                         ids=lambda v: v.describe())
def test_call_variants_compile(variant):
    attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal, stats=("lse", "max"))).for_call(variant)
    q, k, v = (torch.randn(2, 4, 5, 64, dtype=torch.bfloat16), torch.randn(2, 2, 300, 64, dtype=torch.bfloat16),
               torch.randn(2, 2, 300, 64, dtype=torch.bfloat16))
    kernels = compile_for_gpu(attn, q, k, v, tiles={"BLOCK_M": 16}, backward=not variant.paged)
    names = {k.name for k in kernels}
    assert ("_attn_combine" in names) == variant.split_kv
    # sequence ids and per-head blocks have no closed-form range: their live tiles are listed
    assert ("_kv_tile_list" in names) == (variant.packed or variant.block_size is not None)


def test_sigmoid_and_tanh_take_one_special_function_instruction_per_score():
    """At head dim 64 softmax's one exp2 per score keeps the special-function unit (MUFU: exp2, log2,
    reciprocal; 1/8 of the multiply-adds' throughput) about as busy as the tensor cores. Sigmoid and
    tanh took an exp and a division, two such instructions; now one, so sigmoid's kernels need no more
    than softmax's and softcap's (softmax of a tanh) no more than twice (before: 65 vs 37 and 101)."""
    softcap = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: 20.0 * torch.tanh(s / 20.0))
    specs = {"softmax": ag.AttentionSpec(), "sigmoid": ag.AttentionSpec(normalization=ag.norms.Sigmoid()),
             "softcap": softcap}
    mufu = {name: {k.name: k.mufu for k in compile_for_gpu(ag.compile(spec), *_tensors(torch.bfloat16))}
            for name, spec in specs.items()}
    for kernel in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        assert 0 < mufu["sigmoid"][kernel] <= mufu["softmax"][kernel], (kernel, mufu)
        assert mufu["softcap"][kernel] <= 2 * mufu["softmax"][kernel], (kernel, mufu)


@pytest.mark.parametrize("dtype, qk_dim, v_dim", [(torch.bfloat16, 64, 64), (torch.float32, 128, 128),
                                                  (torch.bfloat16, 128, 128), (torch.float16, 256, 64),
                                                  (torch.float16, 40, 24)])
def test_linear_attention_compiles(dtype, qk_dim, v_dim):
    """Every kernel builds and fits shared memory; float32 dots (torch's TF32 switch off) are exact FMA
    products, half-precision ones tensor-core MMAs."""
    spec = ag.LinearAttentionSpec(feature_map=lambda x: torch.sigmoid(x), decay="gated")
    q, k, v = (torch.randn(2, heads, 200, dim, dtype=dtype) for heads, dim in ((4, qk_dim), (2, qk_dim), (2, v_dim)))
    kernels = compile_for_gpu(ag.compile(spec), q, k, v)
    assert [k.name for k in kernels] == ["_linear_fwd", "_linear_bwd_dq", "_linear_bwd_dkdv"]
    for kernel in kernels:
        assert 0 <= kernel.shared_bytes <= H100_SHARED_MEMORY, kernel
        assert (kernel.wgmma + kernel.mma_sync == 0) == (dtype == torch.float32), kernel


@pytest.mark.parametrize("dim", [64, 128])
def test_linear_attention_dots_are_warpgroup_mmas(dim):
    """64-token chunks and the value columns split over programs: at D = 128 too, every dot is a
    warpgroup MMA (with 32-token chunks they were mma.sync). The forward at D = 64 spills nothing; the
    others do (D = 64: dQ 48 B, dK/dV 792 B; D = 128: 416, 784 and 1800 B), a lead for their tiles."""
    spec = ag.LinearAttentionSpec(feature_map="identity", decay=0.97, normalize=False)
    q, k, v = (torch.randn(2, 4, 256, dim, dtype=torch.bfloat16) for _ in range(3))
    for kernel in compile_for_gpu(ag.compile(spec), q, k, v):
        assert kernel.wgmma > 0 and kernel.mma_sync == 0, kernel
        assert dim > 64 or kernel.name != "_linear_fwd" or kernel.spill_bytes == 0, kernel


@pytest.mark.parametrize("q_len, synchronous", [(1, True), (16, False)])
def test_packed_decoding_rows_fill_a_warpgroup_tile(q_len, synchronous):
    """Split-KV decoding's default tile has as many rows as the packed (query head, query) pairs, up to
    64: 4 query heads per kv head x 16 queries fill wgmma's 64 rows, a single query does not."""
    q = torch.zeros(2, 8, q_len, 128, dtype=torch.bfloat16)
    k = torch.zeros(2, 2, 4096, 128, dtype=torch.bfloat16)
    attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal)).for_call(Variant(cache=True, split_kv=True))
    [forward] = [kernel for kernel in compile_for_gpu(attn, q, k, k, backward=False) if kernel.name == "_attn_fwd"]
    assert (forward.mma_sync > 0) == synchronous and (forward.wgmma > 0) != synchronous, forward


def test_mla_decoding_packs_its_query_heads_within_an_a100():
    """Absorbed MLA decoding: 16 query heads over one kv head (Dqk 576, Dv 512), one and two queries per step:
    16 and 32 packed rows of 16-key tiles, and neither spills in the split-KV forward (32 rows spilled 128 B with
    q and k padded to 1024 columns; 64 rows spill 352 B)."""
    attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal)).for_call(Variant(cache=True, split_kv=True))
    for q_len in (1, 2):
        q = torch.zeros(2, 16, q_len, 576, dtype=torch.bfloat16)
        k, v = torch.zeros(2, 1, 4096, 576, dtype=torch.bfloat16), torch.zeros(2, 1, 4096, 512, dtype=torch.bfloat16)
        [forward] = [kernel for kernel in compile_for_gpu(attn, q, k, v, backward=False) if kernel.name == "_attn_fwd"]
        assert forward.shared_bytes <= A100_SHARED_MEMORY and forward.spill_bytes == 0, forward


def test_stick_breaking_default_tiles_use_warpgroup_mma_at_head_dim_128():
    """Its backward adds dK/dV products of BLOCK_N rows with atomics: 32 rows would lower to mma.sync. The
    forward spills nothing; the backward spills 1592 B with its default 4 warps (776 B with 8)."""
    spec = ag.AttentionSpec(normalization=ag.norms.StickBreaking(), mask_mod=ag.masks.causal)
    for kernel in compile_for_gpu(ag.compile(spec), *_tensors(torch.bfloat16, 128, 128)):
        assert kernel.wgmma > 0 and kernel.mma_sync == 0, kernel
        assert kernel.phase == "backward" or kernel.spill_bytes == 0, kernel
