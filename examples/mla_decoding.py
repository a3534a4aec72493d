"""Multi-head latent attention (DeepSeek-V2/V3) decoding in its absorbed form.

Training computes MLA as ordinary attention: each head's key is a projection of a shared 512-dim
latent plus a 64-dim rotary part shared by every head (Dqk 192), its value another projection of
the latent (Dv 128). Decoding caches only the latent and the rotary part, 576 numbers per token,
and folds the key projection into the query: every head then attends over the one cached "kv head"
with Dqk 576 and Dv 512 (the latent itself is the value), and the value projection is applied to
the output. attngen runs that second form directly: head dims above 256 take small tiles.

Each decoding step below equals the matching row of the training form over the whole sequence.
"""

import torch

import attngen as ag

torch.manual_seed(0)
batch, heads, latent, rope, nope, v_dim = 2, 8, 512, 64, 128, 128
prompt, steps = 24, 4
length = prompt + steps

c_kv = torch.randn(batch, length, latent) / latent ** 0.5  # the cached latent of each token
k_rope = torch.randn(batch, length, rope)                   # the cached rotary part, shared by the heads
w_uk = torch.randn(heads, latent, nope) / latent ** 0.5     # latent -> each head's key (no rotary part)
w_uv = torch.randn(heads, latent, v_dim) / latent ** 0.5    # latent -> each head's value
q_nope, q_rope = torch.randn(batch, heads, length, nope), torch.randn(batch, heads, length, rope)

# both forms scale the scores by the training form's head dim, 192
attn = ag.compile(ag.AttentionSpec(mask_mod=ag.masks.causal, scale=(nope + rope) ** -0.5))

# training form: 8 heads of Dqk 192 (128 from the latent + 64 rotary) and Dv 128
k = torch.cat([torch.einsum("bld,hdn->bhln", c_kv, w_uk), k_rope[:, None].expand(-1, heads, -1, -1)], -1)
v = torch.einsum("bld,hdv->bhlv", c_kv, w_uv)
full = attn(torch.cat([q_nope, q_rope], -1), k, v)

# absorbed form: the cache is one kv head of [latent, rotary], 576 per token; the values are its latent part
cache = torch.zeros(batch, 1, length, latent + rope)
cache[:, 0, :prompt] = torch.cat([c_kv, k_rope], -1)[:, :prompt]
worst = 0.0
for t in range(prompt, length):
    cache[:, 0, t] = torch.cat([c_kv[:, t], k_rope[:, t]], -1)
    q = torch.cat([torch.einsum("bhn,hdn->bhd", q_nope[:, :, t], w_uk), q_rope[:, :, t]], -1)[:, :, None]
    out_latent = attn(q, cache, cache[..., :latent], kv_lens=torch.full((batch,), t + 1), mode="decode")
    out = torch.einsum("bhqd,hdv->bhqv", out_latent, w_uv)  # [B, 8, 1, 128]
    worst = max(worst, float((out - full[:, :, t:t + 1]).abs().max()))
print(f"{steps} absorbed decoding steps ({heads} query heads over one kv head of Dqk {latent + rope}, "
      f"Dv {latent}): max difference from the training form {worst:.1e}")
print(f"cache per token: {latent + rope} numbers (training form's keys and values: "
      f"{heads * (nope + rope + v_dim)})")
assert worst < 1e-4
