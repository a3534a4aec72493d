"""attngen attention inside torch.compile(fullgraph=True): a custom op, no graph break."""

import torch

import attngen as ag


def test_fullgraph_compile_matches_eager_including_gradients():
    torch.manual_seed(0)
    slopes = torch.rand(2, requires_grad=True)
    spec = ag.AttentionSpec(score_mod=lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx),
                            mask_mod=ag.masks.causal, stats=("lse", "entropy"))
    attn = ag.compile(spec)
    projection = torch.nn.Linear(32, 96)

    def model(x):
        q, k, v = projection(x).view(1, 24, 3, 2, 16).permute(2, 0, 3, 1, 4)
        out, stats = attn(q, k, v, return_stats=True)
        return out.square().sum() + stats.entropy.sum()

    x = torch.randn(1, 24, 32)
    results = []
    for run in (model, torch.compile(model, fullgraph=True)):
        projection.weight.grad, slopes.grad = None, None
        loss = run(x)
        loss.backward()
        results.append((loss.detach(), projection.weight.grad.clone(), slopes.grad.clone()))
    (eager, *eager_grads), (compiled, *compiled_grads) = results
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)
