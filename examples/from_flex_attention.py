"""Porting FlexAttention code: the same score_mod, mask_mod and BlockMask, one renamed call.

A document mask with a local window and a tanh soft-cap, written for
``torch.nn.attention.flex_attention``, then run by attngen unchanged: the
BlockMask from ``create_block_mask`` carries the mask_mod, as it does for
``flex_attention``. On CPU attngen runs its generated kernels through Triton's
interpreter, and FlexAttention its unfused eager path; both are checked
against each other, and attngen's backward against the float64 reference.
"""

import warnings

import torch
from torch.nn.attention.flex_attention import AuxRequest, and_masks, create_block_mask, flex_attention

import attngen as ag
import attngen.testing

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
B, H, L, D = 2, 4, 256, 32
documents = torch.randint(0, 2, (B, L), device=device).sort(-1).values  # two packed documents per row


def same_document(b, h, q_idx, kv_idx):               # FlexAttention's mask_mod signature
    return documents[b, q_idx] == documents[b, kv_idx]


def causal_within_128(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx <= 128) & (kv_idx <= q_idx)


same_document_within_128 = and_masks(same_document, causal_within_128)  # torch's combinator, traced as it is


def soft_cap(score, b, h, q_idx, kv_idx):              # FlexAttention's score_mod signature
    return 30.0 * torch.tanh(score / 30.0)


block_mask = create_block_mask(same_document_within_128, B, None, L, L, device=device)
q, k, v = (torch.randn(B, H, L, D, device=device) for _ in range(3))

with warnings.catch_warnings():  # eager FlexAttention warns that it is unfused: fine for a comparison
    warnings.simplefilter("ignore")
    expected, expected_aux = flex_attention(q, k, v, score_mod=soft_cap, block_mask=block_mask,
                                            return_aux=AuxRequest(lse=True))
out, aux = ag.attention(q, k, v, score_mod=soft_cap, block_mask=block_mask,  # the renamed call
                        return_aux=AuxRequest(lse=True))
print(f"max |attngen - flex_attention| = {(out - expected).abs().max().item():.2e} "
      f"(lse: {(aux.lse - expected_aux.lse).abs().max().item():.2e})")

# Compiled once, a spec takes the same BlockMask (its mask_mod is the spec's) and trains.
attn = ag.compile(ag.AttentionSpec(score_mod=soft_cap, mask_mod=same_document_within_128))
comparisons = attngen.testing.assert_matches_reference(attn.spec, q, k, v, block_mask=block_mask)
print("forward and backward against the float64 reference:")
for comparison in comparisons:
    print(f"  {comparison}")
stats = attn.block_stats(L, L, B, H, block_mask=block_mask)
print(f"tiles the forward pass visits: {stats['total'] - stats['empty']} of {stats['total']} "
      f"({stats['full']} without evaluating the mask)")
