"""A :class:`~attngen.linear.LinearAttentionSpec` compiled: chunked Triton kernels and a recurrent step."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
import triton

from ..codegen.render import compiler_digest, render_linear
from ..inputs import check_inputs, method_under_autocast
from ..linear import LinearAttentionSpec, LinearState
from ..qkv import KERNEL_DTYPES, LINEAR_MAX_HEAD_DIM, check_device
from ..trace import trace_feature_map
from . import tracing
from .cache import cached_source
from .loader import load_kernels


def _check_state(state, shape, device) -> LinearState:
    """``state`` as a float32 LinearState, after checking it fits these inputs."""
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"state must be a LinearState (kv, n), as a call with return_state=True returns, "
                        f"got {type(state).__name__}")
    kv, n = state
    expected = (shape.batch, shape.q_heads, shape.qk_dim, shape.v_dim)
    if not isinstance(kv, torch.Tensor) or tuple(kv.shape) != expected \
            or not isinstance(n, torch.Tensor) or tuple(n.shape) != expected[:3]:
        raise ValueError(f"state must hold kv {list(expected)} and n {list(expected[:3])} for these q, k, v")
    if kv.device != device or n.device != device:
        raise ValueError(f"state is on {kv.device} but q is on {device}")
    return LinearState(kv.float(), n.float())


class CompiledLinearAttention:
    """A linear attention spec compiled to Triton kernels; call it like ``attn(q, k, v)``."""

    def __init__(self, spec: LinearAttentionSpec):
        started = time.perf_counter()
        self.spec = spec
        self.graph = trace_feature_map(spec.phi)
        self.description = spec.describe()
        identity = "\n".join([self.graph.text(), *self.description, f"compiler {compiler_digest()}",
                              f"triton {triton.__version__}"])
        self.key = hashlib.sha256(identity.encode()).hexdigest()
        # non-causal linear attention is two matrix products, left to torch: no kernels
        self.path, self.cache_hit = cached_source(self.key, self._generate) if spec.causal else (None, False)
        self.compile_seconds = time.perf_counter() - started
        self._traced_name = tracing.register(self)

    def build_for_call(self, call: str, device: torch.device) -> None:
        """Import the kernel module for ``device`` (one kind of call: ``call`` is unused); what a call
        traced by torch.compile cannot do itself (see :mod:`.tracing`)."""
        self._kernels(device)

    def _kernels(self, device: torch.device):
        return load_kernels(self.path, interpret=device.type == "cpu")

    def kernel_graph(self):
        """The optimized feature map graph (with its derivative) the kernels are generated from."""
        from ..ir.passes import optimize  # sympy is only needed to generate

        return optimize(self.graph)

    def _generate(self) -> str:
        return render_linear(self.kernel_graph(), self.description, self.spec.normalize, self.spec.scale,
                             self.spec.eps, self.spec.fixed_log_decay)

    @property
    def source(self) -> str:
        """The generated kernel module's Python source."""
        if self.path is None:
            raise ValueError("non-causal linear attention runs as two torch matrix products: no kernels are generated")
        return self.path.read_text()

    def export(self, path) -> Path:
        """Write the standalone kernel module (imports only torch and triton) to ``path``."""
        source = self.source
        path = Path(path)
        path.write_text(source)
        return path

    def __reduce__(self):
        """Pickles as its spec, compiled again when loaded (from the disk cache)."""
        return CompiledLinearAttention, (self.spec,)

    def __repr__(self) -> str:
        return f"CompiledLinearAttention({', '.join(self.description)}; {self.path})"

    @method_under_autocast
    def __call__(self, q, k, v, *, log_decay=None, state=None, return_state: bool = False):
        """Causal linear attention of q [B,Hq,L,Dqk], k [B,Hkv,L,Dqk], v [B,Hkv,L,Dv] -> [B,Hq,L,Dv]
        (with ``causal=False``, k and v may have another length).

        ``log_decay`` [B, Hq, L] (specs with ``decay="gated"``): each token's log decay, <= 0.
        ``state``: a :class:`LinearState` to continue from (the tokens before these; default none).
        With ``return_state=True`` returns ``(out, LinearState)``: the state after the last token, to
        continue with another call or :meth:`step`. Everything here is differentiable, the states too.
        """
        shape = check_inputs(q, k, v, KERNEL_DTYPES, LINEAR_MAX_HEAD_DIM)
        if not self.spec.causal:
            if return_state or log_decay is not None or state is not None:
                raise ValueError("a non-causal linear attention spec takes no log_decay or state and returns no "
                                 "state")
            return self._all_keys(q, k, v, shape)
        if shape.q_len != shape.kv_len:
            raise ValueError(f"causal linear attention runs over one sequence: q and k must have the same length, "
                             f"got {shape.q_len} and {shape.kv_len}")
        check_device(q.device)
        g = self.spec.log_decays(shape.batch, shape.q_heads, shape.q_len, q.device, log_decay)
        tracing.ready(q, self._traced_name, "")
        kernels = self._kernels(q.device)
        initial = None if state is None else _check_state(state, shape, q.device)
        out, kv, n = kernels.linear_attention(q, k, v, g, self.spec.scale_for(shape.qk_dim), self.spec.eps,
                                               initial)
        return (out, LinearState(kv, n)) if return_state else out

    def _features(self, q, k, v, shape):
        """float32 ``phi(q) * scale``, ``phi(k)`` and v, keys and values repeated over each GQA group."""
        group = shape.q_heads // shape.kv_heads
        return (self.spec.phi(q.float()) * self.spec.scale_for(shape.qk_dim),
                self.spec.phi(k.float()).repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1))

    def _all_keys(self, q, k, v, shape):
        """Non-causal: ``phi(q) (phi(k)^T v)``, float32 matrix products (torch autograd differentiates)."""
        phi_q, phi_k, v32 = self._features(q, k, v, shape)
        out = phi_q @ (phi_k.transpose(-1, -2) @ v32)
        if self.spec.normalize:
            out = out / (phi_q @ phi_k.sum(2, keepdim=True).transpose(-1, -2) + self.spec.eps)
        return out.to(q.dtype)

    @method_under_autocast
    def step(self, q, k, v, state: LinearState, *, log_decay=None):
        """Continue from ``state`` over the tokens of q [B,Hq,T,Dqk], k, v [B,Hkv,T,D] one at a time
        (the recurrent form, for decoding): returns ``(out [B,Hq,T,Dv], the new LinearState)``.
        ``log_decay`` [B, Hq, T] for gated specs."""
        shape = check_inputs(q, k, v, KERNEL_DTYPES, LINEAR_MAX_HEAD_DIM)
        if not self.spec.causal:
            raise ValueError("step() is the recurrent form of causal linear attention; this spec has causal=False")
        kv, n = _check_state(state, shape, q.device)
        g = self.spec.log_decays(shape.batch, shape.q_heads, shape.q_len, q.device, log_decay)
        phi_q, phi_k, v32 = self._features(q, k, v, shape)
        outs = []
        for t in range(shape.q_len):
            decay = torch.exp(g[:, :, t])
            kv = kv * decay[..., None, None] + phi_k[:, :, t, :, None] * v32[:, :, t, None, :]
            n = n * decay[..., None] + phi_k[:, :, t]
            out = torch.einsum("bhd,bhde->bhe", phi_q[:, :, t], kv)
            if self.spec.normalize:
                out = out / ((phi_q[:, :, t] * n).sum(-1, keepdim=True) + self.spec.eps)
            outs.append(out)
        out = torch.stack(outs, dim=2) if outs else q.new_zeros(q.shape[:3] + (shape.v_dim,), dtype=torch.float32)
        return out.to(q.dtype), LinearState(kv, n)
