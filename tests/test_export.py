"""Exported modules against attngen's own calls, on drawn specs, shapes and kinds of call."""

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import attngen as ag
from attngen.blocks import block_size_pair
from attngen.runtime.loader import load_kernels
from attngen.runtime.variants import CALLS
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


def _block_mask(draw, block_size, inputs, keywords) -> ag.BlockMask:
    """A drawn block mask of ``block_size`` blocks for a call on ``inputs``: a bool block matrix, or per-row kv
    block indices (-1: padding)."""
    (q, k, _), (block_q, block_k) = inputs, block_size_pair(block_size)
    kv_len = keywords["block_table"].shape[1] * k.shape[2] if "block_table" in keywords else k.shape[2]
    q_blocks, kv_blocks = -(-q.shape[2] // block_q), -(-kv_len // block_k)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    if draw(st.booleans()):
        return ag.BlockMask(torch.rand(q.shape[0], 1, q_blocks, kv_blocks, generator=generator) < 0.7, block_size)
    return ag.BlockMask(torch.randint(-1, kv_blocks, (1, q.shape[1], q_blocks, 2), generator=generator), block_size)


MODES = {"cache": "prefill", "decode": "decode", "paged": "decode"}


def _outcome(call):
    """What ``call()`` returns, or the ValueError or TypeError it raises."""
    try:
        return call()
    except (ValueError, TypeError) as refused:
        return refused


@settings(max_examples=16, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(spec=specs(heads=4, batch=2, max_len=40), case=shapes(max_len=40, batch=2, heads=4),
       call=st.sampled_from(list(CALLS)), data=st.data())
def test_an_exported_module_computes_what_attngen_computes(tmp_path_factory, spec, case, call, data):
    """``forward(q, k, v, *attn.exported_tensors(), **call)`` of the module ``attn.export(path, call=...)`` wrote
    (``attn.with_block_mask(block_size)``'s for calls with a block mask) gives attngen's output and gradients
    (of q, k, v and the learnable tensors) bit for bit: the same kernels, fed the same tensors (paged calls have
    no backward)."""
    block_size = None if call == "packed" else data.draw(st.sampled_from([None, 8, (4, 16)]), label="block_size")
    event(f"{call} call{' with a block mask' if block_size is not None else ''}")
    attn = ag.compile(spec.value)
    path = tmp_path_factory.mktemp("export") / f"{call}.py"
    if call == "packed" and any(m.block_q is not None for m in map_stats(spec.value.stats)):
        with pytest.raises(ValueError, match="pooled maps are not defined for packed sequences"):
            attn.export(path, call=call)
        return
    exported = attn if block_size is None else attn.with_block_mask(block_size)
    module = load_kernels(exported.export(path, call=call), interpret=True)
    inputs, keywords = _inputs(data.draw, call, *case.tensors(requires_grad=call != "paged"))
    if block_size is not None:
        keywords["block_mask"] = _block_mask(data.draw, block_size, inputs, keywords)
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
