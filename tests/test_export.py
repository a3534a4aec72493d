"""Exported modules against attngen's own calls, on drawn specs, shapes and kinds of call."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attngen as ag
from attngen.runtime.loader import load_kernels
from attngen.runtime.variants import EXPORTED_CALLS
from attngen.stats import map_stats
from attngen.testing.cases import packed_call, paged_call
from attngen.testing.strategies import shapes, specs


def _inputs(draw, call: str, q, k, v):
    """``((q, k, v), keywords)`` of a call of kind ``call`` on a case's inputs, as attngen's call and the
    exported ``forward`` both take them (attngen's own ``mode`` aside)."""
    batch, kv_len, q_len = q.shape[0], k.shape[2], q.shape[2]
    lens = st.lists(st.integers(0, kv_len), min_size=batch, max_size=batch)
    if call == "packed":
        return packed_call(q, k, v, draw(st.lists(st.integers(0, q_len), min_size=batch, max_size=batch)),
                           draw(lens))
    if call == "paged":
        return paged_call(q, k, v, draw(lens), page_size=draw(st.sampled_from([4, 16])), seed=draw(st.integers(0, 99)))
    if call in ("cache", "decode"):
        offsets = draw(st.lists(st.integers(0, max(0, kv_len - q_len)), min_size=batch, max_size=batch))
        return (q, k, v), dict(kv_lens=torch.tensor(draw(lens)), q_offset=torch.tensor(offsets))
    if call == "dropout":
        return (q, k, v), dict(dropout_p=draw(st.sampled_from([0.1, 0.5])), seed=draw(st.integers(0, 2**40)))
    return (q, k, v), {}


MODES = {"cache": "prefill", "decode": "decode", "paged": "decode"}


def _outcome(call):
    """What ``call()`` returns, or the ValueError or TypeError it raises."""
    try:
        return call()
    except (ValueError, TypeError) as refused:
        return refused


@settings(max_examples=14, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(spec=specs(heads=4, batch=2, max_len=40), case=shapes(max_len=40, batch=2, heads=4),
       call=st.sampled_from(EXPORTED_CALLS), data=st.data())
def test_an_exported_module_computes_what_attngen_computes(tmp_path_factory, spec, case, call, data):
    """``forward(q, k, v, *attn.exported_tensors(), **call)`` of the module ``attn.export(path, call=...)`` wrote
    gives attngen's output and gradients (of q, k, v and the learnable tensors) bit for bit: the same kernels,
    fed the same tensors (paged calls have no backward)."""
    attn = ag.compile(spec.value)
    path = tmp_path_factory.mktemp("export") / f"{call}.py"
    if call == "packed" and any(m.block_q is not None for m in map_stats(spec.value.stats)):
        with pytest.raises(ValueError, match="pooled maps are not defined for packed sequences"):
            attn.export(path, call=call)
        return
    module = load_kernels(attn.export(path, call=call), interpret=True)
    inputs, keywords = _inputs(data.draw, call, *case.tensors(requires_grad=call != "paged"))
    tensors = attn.exported_tensors()
    got = _outcome(lambda: module.forward(*inputs, *tensors, **keywords)[0])
    want = _outcome(lambda: attn(*inputs, mode=MODES.get(call), **keywords))
    if isinstance(want, Exception):  # e.g. a table read at the positions of queries before a short cache
        assert (type(got), str(got)) == (type(want), str(want))
        return
    assert torch.equal(got, want)
    if call != "paged":
        wrt = [*inputs, *(t for t in tensors if t.requires_grad)]
        for got_grad, want_grad in zip(torch.autograd.grad(got.sum(), wrt, allow_unused=True),
                                       torch.autograd.grad(want.sum(), wrt, allow_unused=True)):
            assert (got_grad is None) == (want_grad is None)
            assert got_grad is None or torch.equal(got_grad, want_grad)
