"""Export a spec's kernels as one standalone file and run it where attngen is not installed.

Writes the generated module of a soft-capped, sliding-window ALiBi spec (kernels, launchers, autograd and
the entry point ``forward(q, k, v, *captured)``) and that of decoding from a KV cache with it
(``call="decode"``: ``forward(q, k, v, *captured, kv_lens=None, q_offset=None)``), runs them in a fresh
Python process in which importing attngen fails, and checks their outputs and gradients against
attngen's own calls. On CPU the exported files run through Triton's interpreter, as attngen does.
"""

import os
import pathlib
import subprocess
import sys
import tempfile

import torch

import attngen as ag

device = "cuda" if torch.cuda.is_available() else "cpu"
slopes = torch.linspace(0.05, 0.5, 4, device=device)


def alibi_softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh((score - slopes[h] * (q_idx - kv_idx)) / 20.0)


spec = ag.AttentionSpec(score_mod=alibi_softcap, mask_mod=ag.masks.causal & ag.masks.sliding_window(32))
attn = ag.compile(spec)

# the exported module on its own: attngen blocked, the inputs and outputs passed through files
RUN_WITHOUT_ATTNGEN = """
import importlib.util, sys, torch
sys.modules["attngen"] = None                       # any import of attngen now fails

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

module, decoding = load("alibi_softcap_kernel", sys.argv[1]), load("alibi_softcap_decode", sys.argv[2])
q, k, v, captured, q_new, kv_lens = torch.load(sys.argv[3])
q, k, v = (t.requires_grad_() for t in (q, k, v))
out, lse = module.forward(q, k, v, *captured)       # the spec's captured tensors ([slopes]), in its order
out.sum().backward()
new_out, _ = decoding.forward(q_new, k.detach(), v.detach(), *captured, kv_lens=kv_lens)  # k, v as caches
torch.save([out.detach(), lse, q.grad, k.grad, v.grad, new_out], sys.argv[4])
try:
    module.forward(q, k[..., :32], v, *captured)    # a mistake: refused in attngen's words
except ValueError as error:
    print(f"  a bad call, refused: {error}")
"""

with tempfile.TemporaryDirectory() as folder:
    folder = pathlib.Path(folder)
    path = attn.export(folder / "alibi_softcap_kernel.py")
    decode_path = attn.export(folder / "alibi_softcap_decode.py", call="decode")
    for written in (path, decode_path):
        print(f"exported {written.name}: {len(written.read_text().splitlines())} lines, imports only torch and triton")
    q, k, v = (torch.randn(2, 4, 100, 64, device=device) for _ in range(3))
    q_new = torch.randn(2, 4, 1, 64, device=device)  # one new token per sequence
    kv_lens = torch.tensor([60, 100], device=device)  # keys held by each sequence's cache (k, v: 100 slots)
    torch.save([q, k, v, attn.exported_tensors(), q_new, kv_lens], folder / "inputs.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"} if device == "cpu" else dict(os.environ)
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_ATTNGEN, str(path), str(decode_path),
                           str(folder / "inputs.pt"), str(folder / "outputs.pt")],
                          env=env, capture_output=True, text=True, check=True)
    print(done.stdout, end="")
    exported = torch.load(folder / "outputs.pt")

new_out = attn(q_new, k, v, kv_lens=kv_lens, mode="decode")
q, k, v = (t.requires_grad_() for t in (q, k, v))
out, stats = attn(q, k, v, return_stats=True)
out.sum().backward()
for name, got, want in zip(("out", "lse", "dq", "dk", "dv", "decoded"), exported,
                           (out, stats.lse, q.grad, k.grad, v.grad, new_out)):
    assert torch.equal(got, want.detach()), name
print("the exported modules' out, lse, dq, dk, dv and decoded tokens equal attngen's calls bit for bit")
