"""Heavy-hitter KV cache eviction (H2O, Zhang et al. 2023) from the fused column sums.

A batch of two sequences decodes against one preallocated cache of 48 slots per kv head, filled to
each sequence's own length (``kv_lens``). Every step asks the same call for ``col_sum(reduce_heads=True)``:
the attention each cached key received, summed over the query heads that share its kv head, [B, Hkv,
slots], 0 past each sequence's keys. Summed over the steps it ranks the keys; once a sequence's cache is
full, each kv head drops its lowest-ranked key outside the 8 most recent. A recent-window cache of the
same size (StreamingLLM without sinks) is the baseline; both are compared with attention over every token.
"""

import dataclasses

import torch

import attngen as ag

torch.manual_seed(0)
batch, q_heads, kv_heads, dim = 2, 4, 2, 32
prompts, steps, slots, recent = (70, 30), 12, 48, 8


def tokens(length, heavy):
    """Queries, keys and values of a sequence whose keys at ``heavy`` stand out along one direction."""
    direction = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    q = torch.randn(q_heads, length, dim) + 2.0 * direction
    k, v = torch.randn(kv_heads, length, dim), torch.randn(kv_heads, length, dim)
    k[:, heavy] += 4.0 * direction
    return q, k, v


sequences = [tokens(n + steps, torch.randperm(n)[:6]) for n in prompts]
spec = ag.AttentionSpec(stats=(ag.stats.col_sum(reduce_heads=True, name="received"),))
attn, ranked = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal)), ag.compile(spec)
prefill = ag.compile(dataclasses.replace(spec, mask_mod=ag.masks.causal))

cache_k, cache_v = torch.zeros(batch, kv_heads, slots + 1, dim), torch.zeros(batch, kv_heads, slots + 1, dim)
score = torch.zeros(batch, kv_heads, slots + 1)  # the attention each cached key received so far
kv_lens = torch.zeros(batch, dtype=torch.int64)


def keep(b, positions, keys, values, received):
    """Sequence ``b``'s cache holds ``keys``, ``values`` and ``received`` at ``positions`` [Hkv, n], in order."""
    n = positions.shape[1]
    cache_k[b, :, :n] = torch.gather(keys, 1, positions[..., None].expand(-1, -1, dim))
    cache_v[b, :, :n] = torch.gather(values, 1, positions[..., None].expand(-1, -1, dim))
    score[b, :, :n] = torch.gather(received, 1, positions)
    kv_lens[b] = n


# prefill each prompt alone: the column sums of its causal attention rank its keys
for b, (n, (q, k, v)) in enumerate(zip(prompts, sequences)):
    _, stats = prefill(q[None, :, :n], k[None, :, :n], v[None, :, :n], return_stats=True)
    positions = torch.arange(n).expand(kv_heads, -1)
    if n > slots:  # the best-ranked older keys and the recent ones
        best = torch.topk(stats.received[0, :, :n - recent], slots - recent, dim=-1).indices.sort(-1).values
        positions = torch.cat([best, positions[:, n - recent:]], -1)
    keep(b, positions, k[:, :n], v[:, :n], stats.received[0])

errors = {"heavy hitters": [], "recent window": []}
for t in range(steps):
    positions = torch.tensor(prompts) + t
    q = torch.stack([s[0][:, p] for s, p in zip(sequences, positions)])[:, :, None]  # [B, Hq, 1, D]
    for b, (s, p) in enumerate(zip(sequences, positions)):  # the new token's key and value join the cache
        cache_k[b, :, kv_lens[b]], cache_v[b, :, kv_lens[b]], score[b, :, kv_lens[b]] = s[1][:, p], s[2][:, p], 0.0
    kv_lens += 1
    out, stats = ranked(q, cache_k, cache_v, kv_lens=kv_lens, return_stats=True)
    if t == 0:  # the fused column sums equal the materialized reference's, 0 past each sequence's keys
        _, expected = ag.reference.attention(q.double(), cache_k.double(), cache_v.double(), ranked.spec,
                                             kv_lens=kv_lens, return_stats=True)
        assert torch.allclose(stats.received.double(), expected.received, atol=1e-6)
    score += stats.received
    for b, (s, p) in enumerate(zip(sequences, positions)):
        start = max(0, int(p) + 1 - slots)
        full, window = (attn(s[0][None, :, p:p + 1], s[1][None, :, lo:p + 1], s[2][None, :, lo:p + 1],
                             kv_lens=torch.tensor([p + 1 - lo])) for lo in (0, start))
        for name, approx in (("heavy hitters", out[b:b + 1]), ("recent window", window)):
            errors[name].append(float((approx - full).norm() / full.norm()))
        if kv_lens[b] > slots:  # evict each kv head's lowest-ranked key outside the recent ones
            older = score[b, :, :kv_lens[b] - recent]
            drop = older.argmin(-1, keepdim=True)
            slots_left = torch.arange(int(kv_lens[b])).expand(kv_heads, -1)
            keep(b, slots_left[slots_left != drop].view(kv_heads, -1), cache_k[b], cache_v[b], score[b])

for name, values in errors.items():
    print(f"{name:14s} ({slots} slots per kv head): mean relative error {sum(values) / len(values):.3f} "
          f"over {len(values)} decoded tokens")
assert sum(errors["heavy hitters"]) < sum(errors["recent window"])
