"""Keep sigmoid attention's logits bounded with QK-clip, reading the fused "max" statistic.

Attention logits that grow without bound destabilize training. QK-clip (as in
MuonClip) watches each head's largest logit and, after an optimizer step,
scales that head's query and key projections by sqrt(tau / max) whenever the
max exceeds tau. The max comes out of attngen's kernels with the output (no
Lq x Lk matrix); for sigmoid attention it is score_mod's largest result per
row, here only monitored (it has a gradient too: a loss on it would train the
logits down, costing the backward its terms). The run is repeated without
the clip, and the kernels' max is checked against the materialized reference.
Runs on CPU (Triton's interpreter) in well under a minute.
"""

import torch

import attngen as ag

BATCH, HEADS, LENGTH, HEAD_DIM, STEPS, TAU = 2, 2, 32, 16, 25, 4.0
MODEL_DIM = HEADS * HEAD_DIM

spec = ag.AttentionSpec(mask_mod=ag.masks.causal, normalization=ag.norms.Sigmoid(bias="-log n"), stats=("max",))
attention = ag.compile(spec)


def clip(qkv: torch.nn.Linear, head_max: torch.Tensor) -> None:
    """Scale the query and key rows of each head whose max logit exceeds TAU by sqrt(TAU / max)."""
    factor = torch.sqrt(TAU / head_max.clamp(min=TAU))  # 1 where the head is within bounds
    rows = factor.repeat_interleave(HEAD_DIM)
    with torch.no_grad():
        for part in (0, 1):  # queries, keys
            block = slice(part * MODEL_DIM, (part + 1) * MODEL_DIM)
            qkv.weight[block] *= rows[:, None]
            qkv.bias[block] *= rows


def train(with_clip: bool) -> list[float]:
    """STEPS of Adam on a toy copy task (sharp attention pays, so logits grow); each step's largest logit."""
    torch.manual_seed(1)
    qkv = torch.nn.Linear(MODEL_DIM, 3 * MODEL_DIM)
    proj = torch.nn.Linear(MODEL_DIM, MODEL_DIM)
    optimizer = torch.optim.Adam([*qkv.parameters(), *proj.parameters()], lr=3e-2)
    x = torch.randn(BATCH, LENGTH, MODEL_DIM, generator=torch.Generator().manual_seed(2))
    target = torch.roll(x, shifts=3, dims=1)  # copy the token three back
    curve = []
    for _ in range(STEPS):
        q, k, v = qkv(x).view(BATCH, LENGTH, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        out, stats = attention(q, k, v, return_stats=True)
        loss = torch.nn.functional.mse_loss(proj(out.transpose(1, 2).reshape(BATCH, LENGTH, MODEL_DIM)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        head_max = stats.max.amax(dim=(0, 2))  # [HEADS]: over the batch and the rows
        expected = ag.reference.attention(q.detach(), k.detach(), v.detach(), spec, return_stats=True)[1].max
        torch.testing.assert_close(stats.max, expected.float(), rtol=1e-5, atol=1e-5)
        if with_clip:
            clip(qkv, head_max)
        curve.append(head_max.max().item())
    return curve


free, clipped = train(with_clip=False), train(with_clip=True)
print(f"largest logit per step, tau = {TAU} (sigmoid attention, {STEPS} steps):")
print("  without QK-clip:", " ".join(f"{m:.1f}" for m in free[::4]))
print("  with QK-clip:   ", " ".join(f"{m:.1f}" for m in clipped[::4]))
print(f"the kernels' max matched the reference at every step; final max {free[-1]:.2f} without the clip, "
      f"{clipped[-1]:.2f} with it")
