"""The same variants through FlexAttention (eager, CPU) and SDPA agree with attngen."""

import pytest
import torch
import torch.nn.functional as F

import attngen as ag

flex = pytest.importorskip("torch.nn.attention.flex_attention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _qkv(Lq=40, Lk=40, H=2):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, L, 32, generator=gen) for L in (Lq, Lk, Lk)]


slopes = torch.rand(2)
MODS = {
    "plain": (None, None),
    "causal": (None, ag.masks.causal),
    "alibi": (lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx), ag.masks.causal),
    "softcap": (lambda s, b, h, q_idx, kv_idx: 3.0 * torch.tanh(s / 3.0), None),
    "sliding_window": (None, ag.masks.sliding_window(5)),
}


@pytest.mark.parametrize("name", MODS)
@pytest.mark.parametrize("lengths", [(40, 40), (17, 50)])
def test_matches_flex_attention(name, lengths):
    score_mod, mask_mod = MODS[name]
    q, k, v = _qkv(*lengths)
    block_mask = None
    if mask_mod is not None:
        block_mask = flex.create_block_mask(mask_mod, 1, 2, lengths[0], lengths[1], device="cpu")
    expected, aux = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                        return_aux=flex.AuxRequest(lse=True))
    out, stats = ag.attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, return_stats=True)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(stats.lse, aux.lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa(causal):
    q, k, v = _qkv(33, 33)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = ag.attention(q, k, v, mask_mod=ag.masks.causal if causal else None)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_matches_sdpa_with_gqa():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, 20, 16, generator=gen)
    k, v = (torch.randn(1, 2, 20, 16, generator=gen) for _ in range(2))
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(ag.attention(q, k, v), expected, atol=2e-5, rtol=2e-5)
