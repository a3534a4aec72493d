"""Quickstart: ALiBi with learnable slopes + a causal mask, compiled by attngen.

Runs on CPU through Triton's interpreter (or on a CUDA GPU, compiled), checks
the kernel against the float64 reference, and reports compile latency.
"""

import time

import torch

import attngen as ag

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
slopes = torch.rand(8, device=device, requires_grad=True)          # learnable ALiBi slopes


def alibi(score, b, h, q_idx, kv_idx):                              # FlexAttention's score_mod signature
    return score - slopes[h] * (q_idx - kv_idx)


spec = ag.AttentionSpec(score_mod=alibi, mask_mod=ag.masks.causal)

started = time.perf_counter()
attn = ag.compile(spec)
compile_ms = (time.perf_counter() - started) * 1e3
started = time.perf_counter()
again = ag.compile(spec)
again_ms = (time.perf_counter() - started) * 1e3
print(f"compile: {compile_ms:.1f} ms ({'disk cache hit' if attn.cache_hit else 'generated'}), "
      f"recompile: {again_ms:.1f} ms (cache hit: {again.cache_hit})")

q, k, v = (torch.randn(2, 8, 128, 64, device=device, requires_grad=True) for _ in range(3))
started = time.perf_counter()
out, stats = attn(q, k, v, return_stats=True)
(out.sum() + stats.lse.sum()).backward()
print(f"forward + backward on {device}: {(time.perf_counter() - started) * 1e3:.0f} ms; "
      f"out {tuple(out.shape)}, lse {tuple(stats.lse.shape)}, slopes.grad {slopes.grad.tolist()[:3]}...")

# The same spec through the materialized float64 reference.
q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
slopes64 = slopes.detach().double().requires_grad_()
spec64 = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes64[h] * (q_idx - kv_idx),
                          mask_mod=ag.masks.causal)
ref, ref_stats = ag.reference.attention(q64, k64, v64, spec64, return_stats=True)
(ref.sum() + ref_stats.lse.sum()).backward()
for name, got, want in [("out", out, ref), ("lse", stats.lse, ref_stats.lse), ("dq", q.grad, q64.grad),
                        ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad), ("dslopes", slopes.grad, slopes64.grad)]:
    print(f"  max |{name} - float64 reference| = {(got.double() - want).abs().max().item():.2e}")

print("\ngenerated score function (see attn.source for the whole module):")
print("@triton.jit\ndef score_fn" + attn.source.split("def score_fn")[1].split("\n\n")[0])
