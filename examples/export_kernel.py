"""Export a spec's kernels as one standalone file and run it where attngen is not installed.

Writes the generated module of a soft-capped, sliding-window ALiBi spec (kernels, launchers, autograd and
the entry point ``forward(q, k, v, *captured)``), runs it in a fresh Python process in which importing
attngen fails, and checks its output and gradients against attngen's own call. On CPU the exported file
runs through Triton's interpreter, as attngen does.
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
spec = importlib.util.spec_from_file_location("alibi_softcap_kernel", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
q, k, v, slopes = torch.load(sys.argv[2])
q, k, v = (t.requires_grad_() for t in (q, k, v))
out, lse = module.forward(q, k, v, slopes)          # the captured tensors, in capture order
out.sum().backward()
torch.save([out.detach(), lse, q.grad, k.grad, v.grad], sys.argv[3])
try:
    module.forward(q, k[..., :32], v, slopes)       # a mistake: refused in attngen's words
except ValueError as error:
    print(f"  a bad call, refused: {error}")
"""

with tempfile.TemporaryDirectory() as folder:
    folder = pathlib.Path(folder)
    path = attn.export(folder / "alibi_softcap_kernel.py")
    print(f"exported {path.name}: {len(path.read_text().splitlines())} lines, imports only torch and triton")
    q, k, v = (torch.randn(2, 4, 100, 64, device=device) for _ in range(3))
    torch.save([q, k, v, slopes], folder / "inputs.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"} if device == "cpu" else dict(os.environ)
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_ATTNGEN, str(path), str(folder / "inputs.pt"),
                           str(folder / "outputs.pt")], env=env, capture_output=True, text=True, check=True)
    print(done.stdout, end="")
    exported = torch.load(folder / "outputs.pt")

q, k, v = (t.requires_grad_() for t in (q, k, v))
out, stats = attn(q, k, v, return_stats=True)
out.sum().backward()
for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), exported, (out, stats.lse, q.grad, k.grad, v.grad)):
    assert torch.equal(got, want.detach()), name
print("the exported module's out, lse, dq, dk and dv equal attngen's call bit for bit")
