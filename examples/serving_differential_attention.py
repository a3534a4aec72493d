"""Serving a differential-attention layer: prefill a prompt, then decode token by token from a
paged KV cache, with GQA.

Each step writes the new token's key and value into its page and attends over the cache with
split-KV decoding (flash decoding; chosen by itself on a GPU for long caches, forced here with
mode="decode"). Every output equals the matching row of one causal call over the whole sequence,
which is what a training step computes.
"""

import torch

import attngen as ag

torch.manual_seed(0)
batch, q_heads, kv_heads, dim, page_size = 2, 8, 2, 32, 16
prompt, steps = 40, 12
length = prompt + steps

lam = torch.linspace(0.3, 0.7, q_heads)  # lambda per query head
attn = ag.compile(ag.AttentionSpec(differential=lam, mask_mod=ag.masks.causal))
q = torch.randn(batch, q_heads, length, dim)
k, v = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
full = attn(q, k, v)  # the whole sequence at once

# the cache: 8 pages of 16 tokens handed out in a shuffled order, 4 to each sequence
table = torch.randperm(8).view(batch, 4).int()
k_pages, v_pages = torch.zeros(8, kv_heads, page_size, dim), torch.zeros(8, kv_heads, page_size, dim)


def write(positions: range) -> None:
    """Store the keys and values of ``positions`` (every sequence) in their pages."""
    for t in positions:
        page, slot = table[:, t // page_size].long(), t % page_size
        k_pages[page, :, slot], v_pages[page, :, slot] = k[:, :, t], v[:, :, t]


write(range(prompt))
lens = torch.full((batch,), prompt)
out = attn(q[:, :, :prompt], k_pages, v_pages, kv_lens=lens, block_table=table)
print(f"prefill of {prompt} tokens: max difference {(out - full[:, :, :prompt]).abs().max():.1e}")

worst = 0.0
for t in range(prompt, length):
    write(range(t, t + 1))
    step = attn(q[:, :, t:t + 1], k_pages, v_pages, kv_lens=lens + (t - prompt + 1), block_table=table,
                mode="decode")
    worst = max(worst, float((step - full[:, :, t:t + 1]).abs().max()))
print(f"{steps} decoding steps from the paged cache (split-KV): max difference {worst:.1e}")
assert worst < 1e-5
