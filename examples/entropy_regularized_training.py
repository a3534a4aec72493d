"""Train a one-layer attention model with an entropy regularizer, using fused statistics.

loss = task_loss - lambda * mean(entropy of each attention row)

The entropy comes out of attngen's kernels (no Lq x Lk matrix is built) and is
differentiable, so the regularizer trains the model. The same run is repeated
with the materialized reference implementation; the two entropy curves match.
Runs on CPU (Triton's interpreter) in well under a minute.
"""

import torch

import attngen as ag

torch.manual_seed(0)
BATCH, HEADS, LENGTH, HEAD_DIM, STEPS, LAMBDA = 2, 2, 32, 16, 30, 0.05
MODEL_DIM = HEADS * HEAD_DIM

spec = ag.AttentionSpec(mask_mod=ag.masks.causal, stats=("entropy",))
fused = ag.compile(spec)


def reference(q, k, v, return_stats):
    return ag.reference.attention(q, k, v, spec, return_stats=return_stats)


def train(attention, strength=LAMBDA):
    """STEPS of Adam on a toy next-token regression; returns the mean entropy per step."""
    torch.manual_seed(1)
    qkv = torch.nn.Linear(MODEL_DIM, 3 * MODEL_DIM)
    proj = torch.nn.Linear(MODEL_DIM, MODEL_DIM)
    optimizer = torch.optim.Adam([*qkv.parameters(), *proj.parameters()], lr=1e-2)
    data = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, LENGTH, MODEL_DIM, generator=data)
    target = torch.roll(x, shifts=1, dims=1)  # predict the previous token's features
    curve = []
    for _ in range(STEPS):
        q, k, v = qkv(x).view(BATCH, LENGTH, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        out, stats = attention(q, k, v, return_stats=True)
        prediction = proj(out.transpose(1, 2).reshape(BATCH, LENGTH, MODEL_DIM))
        entropy = stats.entropy.mean()
        loss = torch.nn.functional.mse_loss(prediction, target) - strength * entropy
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(entropy.item())
    return curve


fused_curve = train(fused)
reference_curve = train(reference)
print("step  entropy (fused)  entropy (reference)")
for step in range(0, STEPS, 5):
    print(f"{step:4d}  {fused_curve[step]:15.6f}  {reference_curve[step]:19.6f}")
gap = max(abs(a - b) for a, b in zip(fused_curve, reference_curve))
unregularized = train(fused, strength=0.0)[-1]
print(f"entropy went {fused_curve[0]:.4f} -> {fused_curve[-1]:.4f} with the regularizer "
      f"({unregularized:.4f} without); max |fused - reference| = {gap:.2e}")
assert gap < 1e-3, "the fused and reference runs diverged"
assert fused_curve[-1] > unregularized, "the entropy regularizer had no effect"
