"""Linear attention: chunked kernels against the float64 materialized reference, the recurrent step,
learnable and data-dependent decays, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attngen as ag
from attngen.errors import SpecError
from attngen.testing import Case, assert_matches_reference
from attngen.testing.linear_properties import gates, initial_state


def _sigmoid_features(x):
    return 2.0 * torch.sigmoid(x)


SPECS = {
    "elu1": lambda h: ag.LinearAttentionSpec(),
    "relu_unnormalized": lambda h: ag.LinearAttentionSpec(feature_map="relu", normalize=False),
    "retnet": lambda h: ag.LinearAttentionSpec(feature_map="identity", decay=0.9, normalize=False),
    "learnable_decay": lambda h: ag.LinearAttentionSpec(decay=torch.linspace(0.7, 0.99, h).requires_grad_()),
    "gated": lambda h: ag.LinearAttentionSpec(feature_map="identity", decay="gated", normalize=False),
    "gated_user_features": lambda h: ag.LinearAttentionSpec(feature_map=_sigmoid_features, decay="gated"),
    "non_causal": lambda h: ag.LinearAttentionSpec(causal=False),
}
CASES = [Case(2, 4, 2, 37, 37, 24, 40), Case(1, 2, 2, 16, 16, 16, 16), Case(1, 3, 1, 70, 70, 64, 8),
         Case(1, 1, 1, 1, 1, 8, 8)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_linear_attention_matches_reference(name, case):
    spec = SPECS[name](case.q_heads)
    call = {"log_decay": gates(case, requires_grad=True)} if spec.decay == "gated" else {}
    results = assert_matches_reference(spec, *case.tensors(), **call)
    compared = {r.name for r in results}
    assert {"out", "dq", "dk", "dv"} <= compared
    assert ("d log_decay" in compared) == bool(call)
    assert ("d decay" in compared) == isinstance(spec.decay, torch.Tensor)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.integers(1, 2), length=st.integers(1, 90),
       qk_dim=st.integers(1, 40), v_dim=st.integers(1, 40), name=st.sampled_from(sorted(SPECS)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_linear_attention_on_random_shapes(batch, kv_heads, group, length, qk_dim, v_dim, name, dtype):
    case = Case(batch, kv_heads * group, kv_heads, length, length, qk_dim, v_dim, dtype=dtype)
    spec = SPECS[name](case.q_heads)
    call = {"log_decay": gates(case, requires_grad=True)} if spec.decay == "gated" else {}
    assert_matches_reference(spec, *case.tensors(), **call)


@pytest.mark.parametrize("case", [Case(2, 4, 2, 37, 50, 24, 40), Case(1, 2, 1, 9, 1, 8, 4)], ids=lambda c: c.id)
def test_non_causal_linear_attention_takes_other_key_lengths(case):
    assert_matches_reference(ag.LinearAttentionSpec(feature_map="relu", causal=False), *case.tensors())


def test_prefill_then_steps_equals_one_call():
    case = Case(2, 4, 2, 40, 40, 16, 24)
    spec = ag.LinearAttentionSpec(decay="gated")
    attn = ag.compile(spec)
    q, k, v = case.tensors(requires_grad=False)
    decays = gates(case)
    whole, final = attn(q, k, v, log_decay=decays, return_state=True)
    prefix, state = attn(q[:, :, :29], k[:, :, :29], v[:, :, :29], log_decay=decays[:, :, :29], return_state=True)
    rest, stepped = attn.step(q[:, :, 29:], k[:, :, 29:], v[:, :, 29:], state, log_decay=decays[:, :, 29:])
    torch.testing.assert_close(torch.cat([prefix, rest], dim=2), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stepped.kv, final.kv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stepped.n, final.n, atol=1e-5, rtol=1e-5)


def test_state_is_the_decayed_sum_of_key_value_products():
    case = Case(1, 2, 1, 21, 21, 8, 12)
    spec = ag.LinearAttentionSpec(feature_map="relu", decay=0.8)
    q, k, v = case.tensors(requires_grad=False)
    _, state = ag.compile(spec)(q, k, v, return_state=True)
    weights = 0.8 ** torch.arange(20, -1, -1.0)  # key j reaches the end with gamma ** (L - 1 - j)
    features = torch.relu(k[0, 0])
    torch.testing.assert_close(state.kv[0, 1], (features * weights[:, None]).T @ v[0, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.n[0, 0], (features * weights[:, None]).sum(0), atol=1e-5, rtol=1e-5)
    assert not state.kv.requires_grad


def test_no_decay_normalized_elu_is_katharopoulos_attention():
    q, k, v = Case(1, 1, 1, 12, 12, 4, 4).tensors(requires_grad=False)
    out = ag.compile(ag.LinearAttentionSpec(scale=1.0, eps=0.0))(q, k, v)
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    expected = torch.stack([(phi_q[0, 0, i] @ phi_k[0, 0, :i + 1].T) @ v[0, 0, :i + 1]
                            / (phi_q[0, 0, i] @ phi_k[0, 0, :i + 1].sum(0)) for i in range(12)])
    torch.testing.assert_close(out[0, 0], expected, atol=1e-5, rtol=1e-5)


def test_generated_module_names_the_spec_and_imports_only_torch_and_triton(tmp_path):
    attn = ag.compile(ag.LinearAttentionSpec(feature_map=_sigmoid_features, decay=0.5))
    source = attn.source
    assert "return 2.0 * torch.sigmoid(x)" in source and "decay = 0.5" in source
    imports = {line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports == {"functools", "hashlib", "math", "warnings", "torch", "triton", "triton.language"}
    assert ag.compile(ag.LinearAttentionSpec(feature_map=_sigmoid_features, decay=0.5)).cache_hit
    assert attn.export(tmp_path / "linear.py").read_text() == source


@pytest.mark.parametrize("make, message", [
    (lambda: ag.LinearAttentionSpec(feature_map="softmax"), "feature_map must be one of"),
    (lambda: ag.LinearAttentionSpec(feature_map=lambda x, y: x), "feature_map must take 1 positional"),
    (lambda: ag.LinearAttentionSpec(decay=1.5), "decay must be in (0, 1]"),
    (lambda: ag.LinearAttentionSpec(decay="exponential"), "decay must be None"),
    (lambda: ag.LinearAttentionSpec(decay=torch.tensor([0.5, 0.0])), "decay values must be in (0, 1]"),
    (lambda: ag.LinearAttentionSpec(scale=-1.0), "scale must be a positive"),
    (lambda: ag.LinearAttentionSpec(causal=False, decay=0.9), "decay needs causal=True"),
    (lambda: ag.compile(ag.LinearAttentionSpec(feature_map=lambda x: x if x > 0 else 0.0)), "control flow"),
    (lambda: ag.compile(ag.LinearAttentionSpec(feature_map=lambda x: x * torch.ones(3)[0])),
     "feature_map reads a captured tensor"),
])
def test_bad_specs_raise_clear_errors(make, message):
    with pytest.raises(SpecError, match=_escaped(message)):
        make()


def _escaped(message: str) -> str:
    return "".join("\\" + c if c in "()[]." else c for c in message)


def test_bad_calls_raise_clear_errors():
    attn = ag.compile(ag.LinearAttentionSpec(decay="gated"))
    q, k, v = Case(1, 2, 1, 8, 8, 4, 4).tensors(requires_grad=False)
    decays = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="pass log_decay="):
        attn(q, k, v)
    with pytest.raises(ValueError, match=r"log_decay must be a floating-point tensor of shape \[1, 2, 8\]"):
        attn(q, k, v, log_decay=torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match="q and k must have the same length"):
        attn(q, k[:, :, :5], v[:, :, :5], log_decay=decays)
    with pytest.raises(TypeError, match="q has dtype torch.float64"):
        attn(q.double(), k.double(), v.double(), log_decay=decays)
    with pytest.raises(TypeError, match="state must be a LinearState"):
        attn(q, k, v, log_decay=decays, state=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="state must hold kv"):
        attn.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], ag.LinearState(torch.zeros(1, 2, 4, 5), torch.zeros(1, 2, 4)),
                  log_decay=decays[:, :, :1])
    wide = torch.zeros(1, 2, 8, 320)
    with pytest.raises(ValueError, match="between 1 and 256, got 320"):
        attn(wide, wide[:, :1], torch.zeros(1, 1, 8, 128), log_decay=decays)
    plain = ag.compile(ag.LinearAttentionSpec(decay=torch.tensor([0.5, 0.6, 0.7])))
    with pytest.raises(ValueError, match="only taken by specs with decay='gated'"):
        plain(q, k, v, log_decay=decays)
    with pytest.raises(ValueError, match=r"3 entries; expected one per query head \(2\)"):
        plain(q, k, v)
    everywhere = ag.compile(ag.LinearAttentionSpec(causal=False))
    with pytest.raises(ValueError, match="takes no log_decay or state and returns no state"):
        everywhere(q, k, v, return_state=True)
    with pytest.raises(ValueError, match="no kernels are generated"):
        everywhere.export("unused.py")
    with pytest.raises(ValueError, match="this spec has causal=False"):
        everywhere.step(q, k, v, ag.LinearState(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4)))


@pytest.mark.parametrize("case", [Case(2, 4, 2, 37, 37, 24, 40), Case(1, 2, 1, 5, 5, 8, 16),
                                  Case(1, 2, 1, 40, 40, 96, 200)], ids=lambda c: c.id)
@pytest.mark.parametrize("name", ["elu1", "retnet", "learnable_decay", "gated"])
def test_continuing_from_a_state_matches_reference(name, case):
    """From a learnable state, to the final state. The last case splits its 200 value columns over 13
    programs (blocks of 16 on CPU; Dqk * Dv beyond 128 * 128, as GLA's Dv = 2 Dqk): the normalizer's
    terms belong to the first block only, dQ and dK add every block's share."""
    spec = SPECS[name](case.q_heads)
    call = {"log_decay": gates(case, requires_grad=True)} if spec.decay == "gated" else {}
    state = initial_state(case, requires_grad=True)
    compared = {r.name for r in assert_matches_reference(spec, *case.tensors(), state=state, **call)}
    assert {"state_kv", "state_n", "d state kv", "d state n"} <= compared


def test_chained_calls_equal_one_call_with_gradients():
    """Splitting a sequence into calls that pass the state on (chunked prefill, truncated BPTT
    without the truncation) gives the one call's outputs, final state and gradients."""
    case = Case(2, 4, 2, 45, 45, 16, 24)
    attn = ag.compile(ag.LinearAttentionSpec(decay="gated"))
    q, k, v = case.tensors()
    decays = gates(case, requires_grad=True)
    upstream = torch.randn(2, 4, 45, 24, generator=torch.Generator().manual_seed(3))

    def gradients(pieces):
        state, outs = None, []
        for piece in pieces:
            out, state = attn(q[:, :, piece], k[:, :, piece], v[:, :, piece], log_decay=decays[:, :, piece],
                              state=state, return_state=True)
            outs.append(out)
        out = torch.cat(outs, dim=2)
        loss = (out * upstream).sum() + state.kv.sum() + state.n.square().sum()
        return [out, state.kv, state.n, *torch.autograd.grad(loss, (q, k, v, decays))]

    whole = gradients([slice(0, 45)])
    chained = gradients([slice(0, 13), slice(13, 14), slice(14, 45)])
    for one, many in zip(whole, chained):  # float32 rounding, relative to each tensor's scale
        assert (many - one).abs().max() <= 1e-5 * one.abs().max()


def test_decay_one_equals_no_decay():
    q, k, v = Case(1, 2, 2, 33, 33, 8, 8).tensors(requires_grad=False)
    none = ag.compile(ag.LinearAttentionSpec())(q, k, v)
    one = ag.compile(ag.LinearAttentionSpec(decay=1.0))(q, k, v)
    torch.testing.assert_close(none, one)
    assert math.isclose(ag.LinearAttentionSpec(decay=0.5).log_decays(1, 1, 1, "cpu")[0, 0, 0].item(), math.log(0.5),
                        rel_tol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["all_keys", "causal"])
def test_autocast_computes_in_its_dtype_with_float32_products_inside(causal):
    """Under torch.autocast, q, k and v are cast to its dtype (as SDPA's are) and the rest runs as outside
    it: the non-causal form's and step()'s float32 matrix products are not lowered to bfloat16."""
    attn = ag.compile(ag.LinearAttentionSpec(causal=causal))
    q, k, v = Case(1, 2, 2, 12, 12, 16, 8, seed=2).tensors(requires_grad=False)
    halves = [t.bfloat16() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(q, k, v)
        stepped = attn.step(q, k, v, ag.LinearState.zeros(1, 2, 16, 8)) if causal else None
    assert out.dtype == torch.bfloat16 and torch.equal(out, attn(*halves))
    if causal:
        expected = attn.step(*halves, ag.LinearState.zeros(1, 2, 16, 8))
        assert torch.equal(stepped[0], expected[0]) and torch.equal(stepped[1].kv, expected[1].kv)
