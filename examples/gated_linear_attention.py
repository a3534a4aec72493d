"""Gated linear attention end to end: prefill in pieces, decode token by token, train through the state.

1. A 96-token prompt is prefilled in two calls (64 + 32 tokens) that pass the
   recurrent state on; the result equals one call over the whole prompt.
2. Eight more tokens are decoded one at a time with ``attn.step`` (the
   recurrent form); they equal the chunked kernels run over all 104 tokens.
3. A learnable gate bias is trained with the loss taken on the second piece
   only: its gradient reaches the first piece through the state.

Runs on CPU (Triton's interpreter) in well under a minute.
"""

import torch

import attngen as ag

torch.manual_seed(0)
BATCH, HEADS, PROMPT, NEW, DIM = 1, 4, 96, 8, 32

attn = ag.compile(ag.LinearAttentionSpec(feature_map="identity", decay="gated", normalize=False))
q, k, v = (torch.randn(BATCH, HEADS, PROMPT + NEW, DIM) for _ in range(3))
gate_logits = torch.randn(BATCH, HEADS, PROMPT + NEW) + 3.0


def log_decay(bias, tokens):
    """Per-token log decays (<= 0) from the gate logits, shifted by a learnable per-head bias."""
    return torch.nn.functional.logsigmoid(gate_logits[:, :, tokens] + bias[None, :, None])


def prefill(bias, pieces):
    """Run the prompt in ``pieces`` (slices), each call continuing from the last one's state."""
    outs, state = [], None
    for piece in pieces:
        out, state = attn(q[:, :, piece], k[:, :, piece], v[:, :, piece], log_decay=log_decay(bias, piece),
                          state=state, return_state=True)
        outs.append(out)
    return torch.cat(outs, dim=2), state


bias = torch.zeros(HEADS)
whole, _ = prefill(bias, [slice(0, PROMPT)])
pieces, state = prefill(bias, [slice(0, 64), slice(64, PROMPT)])
print(f"1. prefill in two calls vs one call: max difference {(pieces - whole).abs().max():.1e}")

decoded = []
for t in range(PROMPT, PROMPT + NEW):
    token = slice(t, t + 1)
    out, state = attn.step(q[:, :, token], k[:, :, token], v[:, :, token], state, log_decay=log_decay(bias, token))
    decoded.append(out)
everything = attn(q, k, v, log_decay=log_decay(bias, slice(0, PROMPT + NEW)))
difference = (torch.cat(decoded, dim=2) - everything[:, :, PROMPT:]).abs().max()
print(f"2. {NEW} decoded tokens vs the chunked kernels: max difference {difference:.1e}")

bias.requires_grad_()
optimizer = torch.optim.Adam([bias], lr=0.1)
target = torch.zeros(BATCH, HEADS, PROMPT - 64, DIM)
for step in range(15):
    out, _ = prefill(bias, [slice(0, 64), slice(64, PROMPT)])
    loss = (out[:, :, 64:] - target).square().mean()  # the second piece only: it sees the first through the state
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 7 == 0:
        print(f"3. step {step:2d}: loss {loss.item():.4f}, gate bias {[round(b, 2) for b in bias.tolist()]}")
print(f"3. final loss {loss.item():.4f}: lower gates (more forgetting) shrink the outputs toward the zero target")
