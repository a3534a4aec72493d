"""Adaptively sparse attention: each head learns its own alpha of alpha-entmax (Correia et al. 2019).

alpha = 1 + sigmoid(a_h) stays in (1, 2): near 1 a head is as dense as softmax, at 2 it is
sparsemax. The task (copy the previous token's features) is solved by attending to one key, and
the heads' alphas are trained along with the projections: the backward kernels return
d loss / d alpha through the threshold's dependence on alpha. The same run with the materialized
reference follows the same curve. Runs on CPU (Triton's interpreter) in well under a minute.
"""

import torch

import attngen as ag

BATCH, HEADS, LENGTH, HEAD_DIM, STEPS = 2, 4, 24, 16, 20
MODEL_DIM = HEADS * HEAD_DIM


def spec(alpha):
    """Causal entmax with each head's alpha; the "support" stat counts each row's keys of nonzero weight, the
    "entropy" stat is each row's -sum p log p."""
    return ag.AttentionSpec(normalization=ag.norms.Entmax(alpha), mask_mod=ag.masks.causal,
                            stats=("support", "entropy"))


def fused(q, k, v, alpha):
    # a spec per step over the new alpha: the compiled kernels are reused (a cache hit)
    return ag.compile(spec(alpha))(q, k, v, return_stats=True)


def reference(q, k, v, alpha):
    return ag.reference.attention(q, k, v, spec(alpha), return_stats=True)


def train(attention):
    """STEPS of Adam; returns the loss per step, the final alphas, each head's share of zero weights and
    its mean entropy."""
    torch.manual_seed(1)
    qkv = torch.nn.Linear(MODEL_DIM, 3 * MODEL_DIM)
    proj = torch.nn.Linear(MODEL_DIM, MODEL_DIM)
    a = torch.zeros(HEADS, requires_grad=True)  # alpha = 1.5 to start
    optimizer = torch.optim.Adam([*qkv.parameters(), *proj.parameters(), a], lr=3e-2)
    x = torch.randn(BATCH, LENGTH, MODEL_DIM, generator=torch.Generator().manual_seed(2))
    target = torch.roll(x, shifts=1, dims=1)  # the previous token's features
    losses = []
    for _ in range(STEPS):
        q, k, v = qkv(x).view(BATCH, LENGTH, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        out, _ = attention(q, k, v, 1.0 + torch.sigmoid(a))
        loss = torch.nn.functional.mse_loss(proj(out.transpose(1, 2).reshape(BATCH, LENGTH, MODEL_DIM)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        alpha = 1.0 + torch.sigmoid(a)
        q, k, v = qkv(x).view(BATCH, LENGTH, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        _, stats = attention(q, k, v, alpha)
        causal_keys = BATCH * LENGTH * (LENGTH + 1) / 2  # per head: row i sees i + 1 keys
        zeros = 1.0 - stats.support.sum(dim=(0, 2)) / causal_keys
    return losses, alpha, zeros, stats.entropy.mean(dim=(0, 2))


fused_losses, alpha, zeros, entropy = train(fused)
reference_losses, reference_alpha, _, reference_entropy = train(reference)
print("step  loss (fused)  loss (reference)")
for step in range(0, STEPS, 4):
    print(f"{step:4d}  {fused_losses[step]:12.6f}  {reference_losses[step]:16.6f}")
print("head  alpha (1.5 at the start)  share of exact zeros among the causal weights  mean entropy")
for h in range(HEADS):
    print(f"{h:4d}  {alpha[h].item():26.4f}  {zeros[h].item():44.1%}  {entropy[h].item():12.4f}")
gap = max(abs(a - b) for a, b in zip(fused_losses, reference_losses))
print(f"max |fused - reference| loss = {gap:.2e}, alphas differ by {(alpha - reference_alpha).abs().max().item():.2e}")
assert gap < 1e-4 and torch.allclose(alpha, reference_alpha, atol=1e-4), "the fused and reference runs diverged"
assert (alpha - 1.5).abs().min() > 1e-3, "a head's alpha did not learn"
assert torch.allclose(entropy, reference_entropy, atol=1e-4), "the fused and reference entropies differ"
