"""User mistakes get clear errors naming the argument, never a Triton trace."""

import math

import numpy as np
import pytest
import torch

import attngen as ag
from attngen.testing import assert_matches_reference

from variants import T5_BUCKET

q = torch.randn(1, 4, 16, 32)
k = torch.randn(1, 2, 16, 32)
v = torch.randn(1, 2, 16, 16)
attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal))


@pytest.mark.parametrize("args, error, message", [
    ((q[0], k, v), ValueError, "q must have 4 dimensions"),
    ((q, k, v[0]), ValueError, "v must have 4 dimensions"),
    ((q, k[:, :1].expand(1, 3, 16, 32), v), ValueError, "k and v must have the same number of heads"),
    ((torch.randn(1, 3, 16, 32), k, v), ValueError, "multiple of the number of key/value heads"),
    ((q[:, :0], k[:, :0], v[:, :0]), ValueError, r"k and v must have at least one head, got shape \(1, 0, 16, 32\)"),
    ((torch.randn(2, 4, 16, 32), k, v), ValueError, "batch sizes differ"),
    ((q, k, v[:, :, :8]), ValueError, "same sequence length"),
    ((torch.randn(1, 4, 16, 16), k, v), ValueError, "same head dim"),
    ((q, k.half(), v), TypeError, "same dtype"),
    ((q.double(), k.double(), v.double()), TypeError, "the kernels support"),
    ((q.int(), k, v), TypeError, "floating-point"),
    (("q", k, v), TypeError, "q must be a torch.Tensor"),
    ((q[..., :0], k[..., :0], v), ValueError, "head dim must be between 1"),
    ((q, k, torch.randn(1, 2, 16, 1025)), ValueError, "v head dim must be between 1 and 1024, got 1025"),
    ((torch.zeros(65536, 1, 1, 8),) * 3, ValueError, "at most 65535 batch entries .* got a batch of 65536"),
])
def test_bad_inputs(args, error, message):
    with pytest.raises(error, match=message):
        attn(*args)


@pytest.mark.parametrize("transform", [
    lambda call: torch.func.grad(lambda q: call(q).sum())(q),
    lambda call: torch.func.vmap(call)(q[None].expand(3, -1, -1, -1, -1)),
], ids=["grad", "vmap"])
@pytest.mark.parametrize("compiled", [attn, ag.compile(ag.LinearAttentionSpec(feature_map="elu+1"))],
                         ids=["softmax", "linear"])
def test_torch_func_transforms_are_refused_clearly(transform, compiled):
    """The kernels read tensor storage, which torch.func's wrapped tensors do not expose."""
    with pytest.raises(NotImplementedError, match=r"q is a tensor of a torch.func transform .* not torch.func"):
        transform(lambda q: compiled(q, k, v))

def test_device_mismatch_of_captured_tensor():
    slopes = torch.rand(4, device="meta")
    attn = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h]))
    with pytest.raises(ValueError, match=r"captured tensor #0 .* is on meta but q is on cpu"):
        attn(q, k, v)


_TABLE = torch.zeros(2, 17)
_BUCKETS = (torch.arange(48)[:, None] + torch.arange(48)) % 21  # 0..20


@pytest.mark.parametrize("make, message", [
    (lambda docs: ag.AttentionSpec(mask_mod=ag.masks.document(docs[None, :])), "indexed with b in dim 0"),
    (lambda docs: ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - torch.ones(1)[h]),
     "indexed with h in dim 0"),
    (lambda docs: ag.AttentionSpec(mask_mod=ag.masks.document(docs[None, :40].expand(2, 40))), "in dim 1"),
    # a relative-position table that covers a sliding window's offsets alone: the kernels read the masked ones too
    (lambda docs: ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + _TABLE[h, q_idx - kv_idx + 8],
                                   mask_mod=ag.masks.sliding_window(8, 8)),
     r"indexed in dim 1 with an expression of q_idx and kv_idx that runs from -39 to 55 in this call, but that dim "
     r"has 17 entries"),
    (lambda docs: ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + _TABLE[h, 17]), "with the constant 17"),
    # T5-style clipped distances: 17 entries hold -8..8, but the clip is at 9
    (lambda docs: ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx:
                                   s + _TABLE[h, torch.clamp(q_idx - kv_idx, -9, 9) + 8]),
     "expression of q_idx and kv_idx that runs from -1 to 17"),
    # a bias per sum of 4-token block numbers: 48 queries and keys make 23 sums
    (lambda docs: ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + _TABLE[h, q_idx // 4 + kv_idx // 4]),
     "runs from 0 to 22 in this call"),
    # T5's buckets through where, log and conversions (tried at each offset): 48 positions reach bucket 29
    (lambda docs: ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + _TABLE[h, T5_BUCKET(kv_idx - q_idx)]),
     "runs from 0 to 29 in this call, but that dim has 17 entries"),
    # precomputed buckets [Lq, Lk] (as T5 ports build them) that reach 20 where the bias has 17 entries
    (lambda docs: ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + _TABLE[h, _BUCKETS[q_idx, kv_idx]]),
     "expression of q_idx and kv_idx through the values of captured tensor #0 that runs from 0 to 20 in this call"),
    # a bias per document: 4 documents' ids read at b and q_idx, one past the table
    (lambda docs: ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + _TABLE[h, docs.expand(2, 48)[b, q_idx]
                                                                                          + 14]),
     "expression of b and q_idx through the values of captured tensor #0 that runs from 14 to 17"),
], ids=["batch", "head", "query", "relative_offset", "constant", "clamped", "blocks", "t5_buckets", "loaded_buckets",
        "loaded_documents"])
def test_captured_tensor_too_small_for_its_index_is_rejected(make, message):
    """A [1, L] tensor indexed with b does not broadcast (eager torch raises IndexError); the kernel
    would read out of bounds and return wrong values without a word."""
    q = torch.randn(2, 2, 48, 16)
    spec = make(torch.arange(48) // 12)
    with pytest.raises(ValueError, match=message):
        ag.compile(spec)(q, q, q)


def test_kv_cache_positions_are_checked_against_captured_tensors():
    """Under a KV cache the mods see query positions q_idx + q_offset[b] and every position of the cache
    (kv_idx): a tensor read at them is checked with the call's offsets (the kernels would read past it,
    and for the queries return wrong values without a word); one as long as the cache passes."""
    q = torch.randn(2, 2, 3, 16)
    k = v = torch.randn(2, 2, 40, 16)
    lens = torch.tensor([40, 21])  # queries at positions 37..39 and 18..20
    long_enough, short = torch.randn(40), torch.randn(39)
    ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + long_enough[q_idx]))(q, k, v, kv_lens=lens)
    by_query = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + short[q_idx]))
    for mode in ("prefill", "decode"):
        with pytest.raises(ValueError, match=r"captured tensor #0 of shape \(39,\) is indexed in dim 0 with an "
                                             r"expression of b and q_idx through the values of q_offset that runs "
                                             r"from 18 to 39 in this call, but that dim has 39 entries"):
            by_query(q, k, v, kv_lens=lens, mode=mode)
    with pytest.raises(ValueError, match="runs from 2 to 40 in this call"):
        by_query(q, k, v, kv_lens=lens, q_offset=torch.tensor([38, 2]))
    by_query(q, k, v, kv_lens=lens, q_offset=torch.tensor([36, 2]))
    by_key = ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + short[kv_idx]))
    with pytest.raises(ValueError, match=r"indexed with kv_idx in dim 0, which runs to 39 in this call"):
        by_key(q, k, v, kv_lens=torch.tensor([30, 21]))


def test_an_empty_cache_entry_widens_no_checked_position(monkeypatch):
    """A batch entry whose cache is empty (kv_lens 0: an idle slot of a serving batch) has no key, so no
    kernel evaluates a mod for it (recorded below: score_fn sees the other entries alone, forward, split-KV
    and backward); its default offset, kv_lens - Lq < 0, no longer refuses a table read at the queries'
    positions (before: 'runs from -1 to ...'). The live entries' positions are still checked."""
    from attngen.runtime import loader

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 1, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(3, 2, 32, 16, generator=gen, requires_grad=True) for _ in range(2))
    lens = torch.tensor([0, 10, 32])
    relative = torch.randn(2, 63, generator=gen, requires_grad=True)  # q - kv + 31 over queries 0..31
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + relative[h, q_idx - kv_idx + 31],
                            mask_mod=ag.masks.causal)
    attn = ag.compile(spec)
    for mode in ("prefill", "decode"):
        assert_matches_reference(spec, q, k, v, kv_lens=lens, mode=mode)
    evaluated = set()
    for module in list(loader._modules.values()):  # this spec's, and any other this process imported
        for name in ("score_fn", "score_fn_backward"):
            if not hasattr(module, name):  # paged modules have no backward
                continue

            def recording(*args, _traced=getattr(module, name)):
                evaluated.update(int(b) for b in np.unique(args[1].handle.data))
                return _traced(*args)
            monkeypatch.setattr(module, name, recording)
    attn(q, k, v, kv_lens=lens, mode="prefill").sum().backward()
    with torch.no_grad():
        attn(q, k, v, kv_lens=lens, mode="decode")
    assert evaluated == {1, 2}
    with pytest.raises(ValueError, match="through the values of q_offset that runs from -1 to 62 in this call"):
        attn(q, k, v, kv_lens=torch.tensor([1, 0, 32]), q_offset=torch.tensor([-1, 5, 31]))


def test_packed_sequence_positions_are_checked_against_captured_tensors():
    """With packed sequences the mods see each sequence as b and positions within it (the kernels compute
    them from the call's offsets): the spec's own reads are checked at the positions of the longest
    sequence and the number of sequences."""
    cu = torch.tensor([0, 17, 40])  # sequences of 17 and 23 tokens
    q = torch.randn(40, 2, 8)
    relative = torch.randn(20)
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + relative[q_idx - kv_idx + 10])
    with pytest.raises(ValueError, match=r"captured tensor #0 of shape \(20,\) is indexed in dim 0 with an expression "
                                         r"of q_idx and kv_idx that runs from -12 to 32 in this call"):
        ag.compile(spec)(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu)
    per_sequence = torch.randn(2, 23)
    ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + per_sequence[b, kv_idx]))(
        q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu)
    with pytest.raises(ValueError, match=r"indexed with b in dim 0, which runs to 2 in this call"):
        ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + per_sequence[b, kv_idx]))(
            q, q, q, cu_seqlens_q=torch.tensor([0, 17, 30, 40]), cu_seqlens_k=torch.tensor([0, 17, 30, 40]))


def test_python_if_on_traced_value_names_the_line():
    def score_mod(score, b, h, q_idx, kv_idx):
        if q_idx > kv_idx:  # the offending line
            return score
        return score * 2
    with pytest.raises(ag.SpecError, match=r"control flow.*\n  at .*test_errors.py:\d+: if q_idx > kv_idx:"):
        ag.compile(ag.AttentionSpec(score_mod=score_mod))


def test_and_between_traced_values_is_rejected():
    with pytest.raises(ag.SpecError, match="use torch.where"):
        ag.compile(ag.AttentionSpec(mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx and kv_idx > 0))


TABLE = torch.randn(8)


@pytest.mark.parametrize("score_mod, message", [
    (lambda s, b, h, q_idx, kv_idx: math.exp(s), r"converted to a Python number .* not math.exp\(s\)"),
    (lambda s, b, h, q_idx, kv_idx: s + float(q_idx), r"converted to a Python number"),
    (lambda s, b, h, q_idx, kv_idx: s + TABLE[q_idx].item(), r"converted to a Python number \(float\(\), int\(\), "
                                                           r"\.item\(\)"),
    (lambda s, b, h, q_idx, kv_idx: s + [0.0, 1.0][q_idx], r"used as a Python index .*\(torch.tensor\(values\)"),
    (lambda s, b, h, q_idx, kv_idx: s + sum(range(q_idx)), r"used as a Python index or count"),
    (lambda s, b, h, q_idx, kv_idx: np.exp(s), r"numpy cannot compute on traced values"),
    (lambda s, b, h, q_idx, kv_idx: np.maximum(s, 0.0), r"numpy cannot compute on traced values"),
    (lambda s, b, h, q_idx, kv_idx: s + np.ones(1), r"numpy cannot compute on traced values"),
    (lambda s, b, h, q_idx, kv_idx: s + np.ones(8)[q_idx], r"capture torch tensors \(torch.as_tensor\(array\)\)"),
    (lambda s, b, h, q_idx, kv_idx: s.add_(1.0), r"in-place methods such as .add_\(\) are not traced: write "
                                                 r"s = s.add\(...\)"),
    (lambda s, b, h, q_idx, kv_idx: None, r"score_mod returned None: is its return statement missing\?"),
    (lambda s, b, h, q_idx, kv_idx: round(s), r"Python's round\(\) takes no traced value .* torch.round\(x\)"),
], ids=["math", "float", "item", "list", "range", "numpy", "numpy_binary", "numpy_array", "numpy_capture",
         "in_place", "none", "round"])
def test_python_values_of_traced_values_are_named(score_mod, message):
    """Where a mod asks a traced value for a Python number, index, numpy array or in-place update, the
    error says which and what to write instead (before: "Python control flow" for all but in-place)."""
    with pytest.raises(ag.SpecError, match=message):
        ag.compile(ag.AttentionSpec(score_mod=score_mod))


def test_unsupported_torch_function_is_named():
    with pytest.raises(ag.SpecError, match=r"torch.lgamma cannot be traced"):
        ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: torch.lgamma(s)))


@pytest.mark.parametrize("score_mod, message", [
    (lambda s, b, h, q_idx, kv_idx: s.half(), r"no method 'half' \(conversions: .to\(dtype\), .float\(\)"),
    (lambda s, b, h, q_idx, kv_idx: s.to(torch.float16), r"convert to torch.float32, .* not torch.float16"),
    (lambda s, b, h, q_idx, kv_idx: s.to("cuda"), r"convert with .to\(dtype\) only"),
    (lambda s, b, h, q_idx, kv_idx: s + torch.min(q_idx, 0), r"torch.min cannot be traced"),
], ids=["half", "float16", "device", "reduction"])
def test_unsupported_conversions_are_named(score_mod, message):
    with pytest.raises(ag.SpecError, match=message):
        ag.compile(ag.AttentionSpec(score_mod=score_mod))


def test_unindexed_captured_tensor_is_rejected():
    bias = torch.randn(16, 16)
    with pytest.raises(ag.SpecError, match=r"shape \(16, 16\) is used without indexing"):
        ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + bias))


def test_wrong_number_of_indices_is_rejected():
    bias = torch.randn(4, 16, 16)
    with pytest.raises(ag.SpecError, match=r"a vector of 16 entries is used as a value \(a captured tensor indexed at "
                                           r"all but its last dimension, .*\): index every dimension of the tensor"):
        ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + bias[h, q_idx]))
    with pytest.raises(ag.SpecError, match=r"shape \(4, 16, 16\) indexed at 1 of its 3 dimensions is used as a "
                                           r"value: index all 3 dimensions"):
        ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + bias[h]))
    with pytest.raises(ag.SpecError, match=r"indexed with at most 3 integer or traced indices"):
        ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + bias[h, q_idx, kv_idx, 0]))


def test_float_index_is_rejected():
    table = torch.randn(16)
    with pytest.raises(ag.SpecError, match="floating-point"):
        ag.compile(ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + table[s]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(score_mod=lambda s, b, h: s), "score_mod must take 5 positional arguments"),
    (dict(mask_mod=lambda b, h, q_idx: True), "mask_mod must take 4 positional arguments"),
    (dict(score_mod="causal"), "score_mod must be a function"),
    (dict(scale=float("inf")), "scale must be a finite number"),
    (dict(stats=("lse", "bogus")), "unsupported stat 'bogus'"),
    (dict(normalization="softmax"), "normalization must be an attngen.norms object"),
])
def test_bad_specs(kwargs, message):
    with pytest.raises(ag.SpecError, match=message):
        ag.AttentionSpec(**kwargs)


def test_mask_mod_must_return_a_boolean():
    with pytest.raises(ag.SpecError, match="mask_mod must return a boolean"):
        ag.compile(ag.AttentionSpec(mask_mod=lambda b, h, q_idx, kv_idx: q_idx - kv_idx))


def test_compile_rejects_non_specs():
    with pytest.raises(TypeError, match="takes an attngen.AttentionSpec"):
        ag.compile(lambda s, b, h, q, k: s)


def test_interpreter_with_a_numpy_it_cannot_run_with_is_refused(monkeypatch):
    """Triton before 3.7 runs its interpreter into a TypeError inside a kernel with numpy 2.4."""
    import numpy
    import triton
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    with pytest.raises(RuntimeError, match=r"Triton 3.6.0's interpreter .* numpy 2.4.1: install numpy<2.4, or triton>=3.7"):
        ag.compile(ag.AttentionSpec())(q, k, v)
    monkeypatch.setattr(triton, "__version__", "3.7.1")
    assert ag.compile(ag.AttentionSpec())(q, k, v).shape == (*q.shape[:3], v.shape[3])


def test_deterministic_mode_refuses_atomic_float_sums_on_a_gpu(monkeypatch):
    """Under torch.use_deterministic_algorithms(True), as torch's own operations: CUDA kernels that
    would add floats atomically raise where they launch, naming what (with warn_only=True they warn),
    so eager and torch.compile behave alike. Triton's interpreter runs its programs in order, so on
    CPU the same call runs. The sink's gradient is not an atomic sum: each row's part is stored and
    torch adds the parts, as for a captured tensor read at an index of the head, the query or the key alone."""
    from attngen.runtime.loader import load_kernels
    slopes, relative = torch.rand(4, requires_grad=True), torch.rand(39, requires_grad=True)
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx:
                            s - slopes[h] * (q_idx - kv_idx) + relative[q_idx - kv_idx + 19],
                            normalization=ag.norms.Softmax(sink=torch.zeros(4, requires_grad=True)),
                            mask_mod=ag.masks.causal, stats=("lse", "col_sum"))
    attn = ag.compile(spec)
    kernels = load_kernels(attn.path, interpret=True)
    assert kernels.FORWARD_ATOMIC_SUMS == ["the col_sum map"]
    assert kernels.BACKWARD_ATOMIC_SUMS == ["the gradient of captured tensor #1"]  # relative; slopes[h]: row parts
    stick = ag.compile(ag.AttentionSpec(normalization=ag.norms.StickBreaking()))
    assert load_kernels(stick.path, interpret=True).BACKWARD_ATOMIC_SUMS == ["the gradient of k", "the gradient of v"]
    assert "atomic_add" not in ag.compile(ag.LinearAttentionSpec()).source  # parts summed by torch
    q, k, v = (torch.randn(1, 4, 20, 8, requires_grad=True) for _ in range(3))
    cuda = torch.device("cuda")
    summed = kernels.FORWARD_ATOMIC_SUMS + kernels.BACKWARD_ATOMIC_SUMS
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        kernels._alert_nondeterministic(cuda, summed)
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match=r"attngen: the col_sum map, the gradient of captured tensor #1 "
                                               r"are summed on the GPU with atomic float adds"):
            kernels._alert_nondeterministic(cuda, summed)
        kernels._alert_nondeterministic(cuda, [])  # nothing summed: nothing to say
        kernels._alert_nondeterministic(q.device, summed)  # Triton's interpreter: a fixed order
        out, stats = attn(q, k, v, return_stats=True)
        (out.sum() + stats.lse.sum()).backward()
        assert slopes.grad is not None and relative.grad is not None
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="the gradient of captured tensor #1 is summed on the GPU"):
            kernels._alert_nondeterministic(cuda, kernels.BACKWARD_ATOMIC_SUMS)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    # where the kernels launch, eager or compiled: the forward's sums, then (in backward) the gradients'
    for run in (attn, torch.compile(attn, fullgraph=True, backend="aot_eager")):
        alerts = []
        monkeypatch.setattr(kernels, "_alert_nondeterministic", lambda device, what: alerts.append(what))
        out = run(q, k, v)
        assert alerts == [["the col_sum map"]]
        out.sum().backward()
        assert alerts == [["the col_sum map"], ["the gradient of captured tensor #1"]]
