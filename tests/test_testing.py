"""The property-testing toolkit itself: reference comparison, strategies, invariants, fuzzer."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attngen as ag
from attngen.testing import AmbiguousTopK, Case, Float64, assert_matches_reference, check_spec, compare_with_reference
from attngen.testing import invariants, strategies
from attngen.testing.cases import for_spec
from attngen.testing.check import reproduction
from attngen.testing.compare import Comparison, compare, max_error
from attngen.testing.fuzz import FuzzReport, fuzz, fuzz_calls, fuzz_score_mods, fuzz_specs
from attngen.testing.snippets import Snippet, program


def _sneaky(s, b, h, q_idx, kv_idx):
    """Traced: ``s``; on real tensors (the reference): ``2 s``. A stand-in for a miscompiled kernel."""
    return s * 2.0 if isinstance(s, torch.Tensor) else s


def test_every_quantity_is_compared():
    slopes = torch.rand(4, requires_grad=True)
    sink = torch.zeros(4, requires_grad=True)
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx),
                            normalization=ag.norms.Softmax(sink=sink), stats=("lse", "max", "col_sum"))
    results = assert_matches_reference(spec, *Case(1, 4, 2, 20, 30, 16, 8).tensors())
    assert [r.name for r in results] == ["out", "lse", "max", "col_sum", "dq", "dk", "dv", "d capture0", "d sink"]
    assert all(r.ok and r.bound > 0 for r in results)


def test_a_wrong_kernel_is_caught_by_name():
    with pytest.raises(AssertionError, match=r"kernel differs .*\n  out: max error .* exceeds bound"):
        assert_matches_reference(ag.AttentionSpec(score_mod=_sneaky), *Case(1, 2, 2, 9, 9, 8, 8).tensors())


def test_the_reference_of_float32_captures_is_float64_exact():
    table = torch.rand(3, 40)  # float32, as a user would capture it
    spec32 = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s * table[h, q_idx] * 1e3)
    table64 = table.double()
    spec64 = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s * table64[h, q_idx] * 1e3)
    q, k, v = (t.double() for t in Case(1, 3, 3, 40, 40, 8, 8).tensors(requires_grad=False))
    with Float64():
        widened = ag.reference.attention(q, k, v, spec32)
    assert torch.equal(widened, ag.reference.attention(q, k, v, spec64))


def test_the_reference_gives_each_rows_max_and_top_k_margins():
    q = torch.tensor([1.0, 0.0]).expand(1, 1, 3, 2).double()
    k = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.5, 0.0], [9.0, 0.0]]).expand(1, 1, 4, 2).double()
    spec = ag.AttentionSpec(scale=1.0, stats=("max",), mask_mod=lambda b, h, q_idx, kv_idx: kv_idx < 3 - q_idx)
    _, stats = ag.reference.attention(q, k, k, spec, return_stats=True, margins=True)
    assert stats.names() == ("max", "max_margin")
    assert stats.max_margin.tolist() == [[[0.5, 2.0, float("inf")]]]  # keys {3, 1, 2.5}, {3, 1}, {3}
    _, cached = ag.reference.attention(q, k, k, spec, return_stats=True, margins=True, kv_lens=torch.tensor([0]))
    assert cached.max_margin.tolist() == [[[float("inf")] * 3]]  # no keys at all
    assert ag.reference.attention(q, k, k, spec, return_stats=True)[1].names() == ("max",)
    top_2 = dataclasses.replace(spec, stats=(), top_k=2)  # the 2nd largest logit less the next, over max(1, |2nd|)
    _, stats = ag.reference.attention(q, k, k, top_2, return_stats=True, margins=True)
    assert stats.names() == ("top_k_margin",)
    assert stats.top_k_margin.tolist() == [[[1.5 / 2.5, float("inf"), float("inf")]]]


def test_a_top_k_cut_off_within_rounding_is_ambiguous_not_a_mismatch():
    """A score_mod that saturates (0.2 tanh(1.5 s tanh s)^2) rounds logits 4e-8 apart alike in float32 (found by
    attngen fuzz, seed 1038): the kernel kept 5 keys of a row where the reference kept its top 4, an output off by
    0.13. Such inputs raise AmbiguousTopK (fuzz and check draw others); apart, the keys are compared."""
    saturating = ag.AttentionSpec(scale=1.0, top_k=4, score_mod=lambda s, b, h, q_idx, kv_idx:
                                  0.2 * torch.tanh(s * 1.5 * torch.tanh(s)) ** 2)
    q, k, v = Case(1, 2, 2, 31, 17, 16, 8, seed=236, grid=True).tensors()
    with pytest.raises(AmbiguousTopK, match=r"top 4 logits by relative margins down to .*float32 logits may cross"):
        compare_with_reference(saturating, q, k, v)
    assert_matches_reference(dataclasses.replace(saturating, score_mod=None), q, k, v)


@pytest.mark.parametrize("gap, caught", [(3e-7, False), (3e-3, True)])
def test_the_max_gradient_is_not_compared_on_near_ties(gap, caught):
    """Keys 5 and 6 are identical: the kernel gives the max's gradient to key 5 (the first); the reference
    sees key 6 ahead by ``gap``. Within float32's rounding of the max that is a tie either could win,
    and the comparison leaves those rows' max gradient out; beyond it, a wrong arg-max is caught."""
    def ahead(s, b, h, q_idx, kv_idx):  # traced (the kernel): s; on tensors (the reference): key 6 ahead
        return s + gap * (kv_idx == 6) if isinstance(s, torch.Tensor) else s
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 12, 8, generator=gen)
    k[:, :, 6] = k[:, :, 5]
    q = k[:, :, 5:6].expand(1, 1, 3, 8) * 2.0
    results = compare_with_reference(ag.AttentionSpec(score_mod=ahead, stats=("max",)), q, k, k)
    failed = {r.name for r in results if not r.ok}
    assert "dk" in failed if caught else not failed


def test_the_rule_is_twice_the_torch_error_plus_a_floor():
    exact = torch.tensor([1.0, 2.0], dtype=torch.float64)
    result = compare("x", exact + 0.01, exact, exact + 0.1, torch.bfloat16)
    assert result.ok and result.bound == pytest.approx(2 * 0.1 + 4e-3 * 2.0)
    assert not compare("x", exact + 0.3, exact, exact + 0.1, torch.bfloat16).ok


def test_a_nan_in_the_reference_matches_nothing():
    """A NaN in the float64 reference is the spec's own (0 * inf): a kernel's NaN there is no match, whatever the
    baseline (scalable softmax's learnable s had NaN gradients in kernels, reference and baseline alike, and
    passed). Infinities of the same sign still match."""
    expected = torch.tensor([1.0, math.nan], dtype=torch.float64)
    result = compare("d s", expected.float(), expected, expected.float(), torch.float32)
    assert not result.ok and str(result).startswith("d s (NaN in the float64 reference)")
    infinite = torch.tensor([1.0, -math.inf], dtype=torch.float64)
    assert compare("lse", infinite.float(), infinite, infinite.float(), torch.float32).ok
    assert max_error(torch.tensor([math.nan]), torch.tensor([math.nan])) == math.inf


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_strategies_draw_runnable_specs_and_cases(data):
    case = data.draw(strategies.shapes(max_len=40, heads=4))
    assert case.q_heads == 4 and 1 <= case.q_len <= 40 and case.q_heads % case.kv_heads == 0
    spec = data.draw(strategies.specs(heads=4, batch=2, max_len=40))
    assert isinstance(spec.value, ag.AttentionSpec)
    namespace = {}
    exec(program(spec), namespace)  # the printed source is a complete program
    assert isinstance(namespace["SPEC"], ag.AttentionSpec)
    assert repr(namespace["SPEC"].stats) == repr(spec.value.stats)
    ag.compile(spec.value)


@pytest.mark.parametrize("name", sorted(invariants.PROPERTIES))
def test_invariants_hold(name):
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s * (1.0 + 0.1 * h), stats=("lse", "max"))
    results = invariants.PROPERTIES[name](spec, Case(2, 4, 2, 21, 33, 16, 8))
    assert results and all(r.ok for r in results), [str(r) for r in results]


@pytest.mark.parametrize("name", sorted(invariants.PROPERTIES))
def test_invariants_hold_or_do_not_apply_to_differential_attention(name):
    """Differential attention has no statistics: the row-sum property, which reads a weights map, does not apply
    (it raised SpecError from `attngen check specs/differential.py`)."""
    spec = ag.AttentionSpec(differential=0.5, mask_mod=ag.masks.causal)
    results = invariants.PROPERTIES[name](spec, Case(2, 4, 2, 21, 33, 16, 8))
    assert all(r.ok for r in results), [str(r) for r in results]


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_sparsemax_and_entmax_rows_sum_to_one(alpha, monkeypatch):
    spec = ag.AttentionSpec(normalization=ag.norms.Entmax(alpha), mask_mod=lambda b, h, q_idx, kv_idx: kv_idx < q_idx)
    case = Case(1, 2, 2, 9, 12, 16, 8)
    results = invariants.rows_sum_to_one(spec, case)  # the first row has no key: 0
    assert results and all(r.ok for r in results), [str(r) for r in results]
    real = invariants._run
    monkeypatch.setattr(invariants, "_run", lambda *args: {**(got := real(*args)), "weights": got["weights"] * 1.001})
    assert not any(r.ok for r in invariants.rows_sum_to_one(spec, case))  # a normalizer off by 1e-3 is caught


def test_an_invariant_catches_a_kernel_that_reads_key_order(monkeypatch):
    real = invariants._run

    def order_dependent(spec, q, k, v):  # a bug: the first key leaks into every output
        result = real(spec, q, k, v)
        return {**result, "out": result["out"] + 0.01 * k[:, :1, :1, :1]}
    monkeypatch.setattr(invariants, "_run", order_dependent)
    results = invariants.key_permutation(ag.AttentionSpec(), Case(1, 2, 2, 10, 10, 8, 8))
    assert any(not r.ok for r in results)


def test_check_spec_reports_and_reproduces_a_failure(tmp_path):
    reports = check_spec(ag.AttentionSpec(score_mod=_sneaky), examples=3, heads=2, properties=["reference"])
    [report] = reports
    assert not report.ok and report.failure_case.q_len == 1  # simplified to the smallest failing shape
    spec_file = tmp_path / "sneaky.py"
    spec_file.write_text("import torch, attngen as ag\n" + "\n".join(
        ["def sneaky(s, b, h, q_idx, kv_idx):", "    return s * 2.0 if isinstance(s, torch.Tensor) else s",
         "SPEC = ag.AttentionSpec(score_mod=sneaky)"]) + "\n")
    snippet = reproduction(report, f"import runpy\nSPEC = runpy.run_path({str(spec_file)!r})['SPEC']")
    with pytest.raises(AssertionError, match="kernel differs"):
        exec(snippet, {})


def test_invariants_that_do_not_apply_are_skipped():
    uses_b = ag.AttentionSpec(mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + b)
    assert invariants.batch_split(uses_b, Case(2, 2, 2, 8, 8, 8, 8)) == []
    assert invariants.key_permutation(ag.AttentionSpec(mask_mod=ag.masks.causal), Case(1, 2, 2, 8, 8, 8, 8)) == []
    assert invariants.rows_sum_to_one(ag.AttentionSpec(normalization=ag.norms.Sigmoid()), Case(1, 1, 1, 4, 4, 8, 8)) == []


def test_cases_whose_masked_positions_index_out_of_a_captured_tensor_are_skipped():
    """The kernels evaluate score_mod on masked positions too (the reference only on kept ones): a bias
    table that covers only a sliding window's offsets is out of range for a longer case."""
    from attngen.testing.check import _fits
    table = torch.zeros(2, 9)
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s + table[h, q_idx - kv_idx + 4],
                            mask_mod=ag.masks.sliding_window(4, 4))
    assert _fits(spec, Case(1, 2, 2, 5, 5, 8, 8)) and not _fits(spec, Case(1, 2, 2, 6, 6, 8, 8))


def test_fuzzer_default_profile_finds_no_mismatch():
    """The CI profile of the spec fuzzer; `attngen fuzz --deep` runs 10,000 specs."""
    report = fuzz(examples=3 * settings().max_examples, seed=7)
    assert report.spec is None, report.reproduction()
    assert report.examples == 3 * settings().max_examples


def test_fuzzer_in_half_precision_finds_no_mismatch():
    """bf16 and fp16 inputs (`attngen fuzz --half`): its first run found affine softmax losing beta on
    CPU in bf16."""
    report = fuzz(examples=settings().max_examples, seed=3, dtypes=(torch.bfloat16, torch.float16))
    assert report.spec is None, report.reproduction()


def test_fuzzer_draws_the_dtypes_asked_for(monkeypatch):
    import attngen.testing.fuzz as fuzz_module
    seen = []
    monkeypatch.setattr(fuzz_module, "compare_with_reference",
                        lambda spec, q, *args, **kwargs: seen.append(q.dtype) or [])
    assert fuzz(examples=10, seed=2, dtypes=(torch.bfloat16, torch.float16)).examples == 10
    assert set(seen) == {torch.bfloat16, torch.float16}


@pytest.mark.parametrize("error, stops", [(1.5e-5, False), (3e-5, True)])
def test_fuzzer_goes_on_past_near_misses_only(monkeypatch, error, stops):
    """With near_miss=2, a spec whose errors stay within twice their bounds is recorded and the run goes
    on; an error past that stops it, shrunk. The default (1) stops at any error past its bound."""
    import attngen.testing.fuzz as fuzz_module
    monkeypatch.setattr(fuzz_module, "compare_with_reference",
                        lambda *args, **kwargs: [Comparison("out", 0.0, 1e-5), Comparison("dq", error, 1e-5)])
    seen = []
    report = fuzz(examples=5, seed=1, near_miss=2.0, on_near_miss=lambda report, miss: seen.append(miss))
    assert (report.spec is not None) == stops
    if stops:
        assert [str(r) for r in report.failure] == ["dq: max error 3.000e-05 exceeds bound 1.000e-05"]
        assert report.near_misses == []
    else:
        assert report.examples == 5 and 1 <= len(report.near_misses) <= 5 and seen == report.near_misses
        assert "assert_matches_reference(SPEC" in report.near_misses[0].reproduction
        assert [str(r) for r in report.near_misses[0].failure] == ["dq: max error 1.500e-05 exceeds bound 1.000e-05"]
        assert fuzz(examples=5, seed=1).spec is not None  # strict by default


def test_fuzzed_calls_cover_every_kind_of_call_the_spec_allows():
    kinds = {"plain": set(), "col_sum": set(), "pooled": set()}
    offset = set()  # the kinds of cache call that put the queries anywhere in the cache (q_offset)
    case = Case(2, 2, 1, 3, 10, 8, 8)
    specs = {"plain": ag.AttentionSpec(), "col_sum": ag.AttentionSpec(stats=("col_sum",)),
             "pooled": ag.AttentionSpec(stats=(ag.stats.pooled(2, 2),))}

    @settings(max_examples=1000, deadline=None, database=None, derandomize=True)  # the same draws every run
    @given(data=st.data())
    def draw(data):
        for name, spec in specs.items():
            (q, k, v), call = data.draw(fuzz_calls(case, spec)).value(*case.tensors())
            kind = "packed" if "cu_seqlens_q" in call else "paged" if "block_table" in call else None
            kinds[name].add((kind, *sorted(set(call) - {"q_offset"}), call.get("mode")))
            if "q_offset" in call:
                offset.add((kind, call["mode"]))
            if kind == "paged":  # the pages hold the cache
                assert torch.equal(ag.reference.gather_pages(k, call["block_table"])[:, :, :case.kv_len],
                                   case.tensors()[1])
            if kind == "packed":
                assert q.shape[0] == int(call["cu_seqlens_q"][-1]) and k.shape[0] == int(call["cu_seqlens_k"][-1])
    draw()

    def calls(*base):  # (kind, keyword names, mode), each also with dropout_p
        return {(kind, *sorted(names + extra), mode) for kind, names, mode in base for extra in ((), ("dropout_p",))}
    both = calls((None, (), None), (None, ("block_mask",), None))
    packed = calls(("packed", ("cu_seqlens_k", "cu_seqlens_q"), None))
    cache = calls(*((kind, names, mode) for mode in ("prefill", "decode") for kind, names in
                    ((None, ("kv_lens", "mode")), (None, ("block_mask", "kv_lens", "mode")),
                     ("paged", ("block_table", "kv_lens", "mode")))))
    for name, expected in (("plain", both | packed | cache), ("col_sum", both | packed | cache),
                           ("pooled", both | cache)):  # pooled maps would straddle packed sequences
        assert kinds[name] == expected, (name, kinds[name] ^ expected)
    assert offset == {(kind, mode) for kind in (None, "paged") for mode in ("prefill", "decode")}


def test_a_fuzz_report_reproduces_its_call():
    report = FuzzReport(spec=Snippet("SPEC", "SPEC = ag.AttentionSpec(differential=0.5)"),
                        case=Case(1, 2, 1, 3, 40, 16, 8),
                        call=Snippet("CALL", "CALL = lambda q, k, v: attngen.testing.paged_call(q, k, v, [29], "
                                             "page_size=16, seed=3, mode='decode')"))
    source = report.reproduction()
    assert "attngen.testing.paged_call(q, k, v, [29]" in source and "**call)" in source
    exec(source, {})  # runs as printed (the kernels match: nothing raised)


@settings(max_examples=300, deadline=None)
@given(mod=fuzz_score_mods(heads=2, batch=1))
def test_fuzzed_scores_depend_on_the_score(mod):
    """One that does not can cancel to within float32's rounding of 0 (fuzz seed 985: tanhshrink of a tiny
    square of an offset), where ReLU's weights and the support count test the sign."""
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = mod.value(s, torch.tensor(0), torch.tensor(1), torch.tensor(5), torch.tensor(3))
    assert torch.autograd.grad(out, s, allow_unused=True)[0] is not None, mod.source()


@settings(max_examples=5, deadline=None)
@given(spec=fuzz_specs(heads=2, batch=1, max_len=24), case=strategies.shapes(max_len=24, heads=2, batch=1))
def test_fuzzed_specs_match_the_reference(spec, case):
    results = compare_with_reference(spec.value, *for_spec(case, spec.value).tensors(), seed=case.seed)
    assert all(r.ok for r in results), (spec, [str(r) for r in results if not r.ok])
