"""``compile(spec)``: trace, optimize, generate (or load from cache) and wrap."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
import triton

from .. import stats as stats_module
from ..codegen.render import compiler_digest, render
from ..inputs import KERNEL_DTYPES, check_inputs
from ..spec import AttentionSpec
from ..trace import trace
from . import autotune
from .cache import cached_source
from .loader import load_kernels


def _per_head_tensor(name: str, value, heads: int, device: torch.device) -> torch.Tensor:
    """A normalization parameter as a contiguous float32 [heads] tensor (autograd-connected)."""
    if not isinstance(value, torch.Tensor):
        return torch.full((heads,), float(value), device=device)
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but q is on {device}")
    if value.dim() == 1 and value.shape[0] != heads:
        raise ValueError(f"{name} has {value.shape[0]} entries; expected one per query head ({heads})")
    return value.float().expand(heads).contiguous()


def norm_parameters(normalization, heads: int, device: torch.device) -> list[torch.Tensor]:
    """The per-head tensors the kernels take for a sink or an affine output."""
    name = type(normalization).__name__
    if normalization.sink is not None:
        return [_per_head_tensor(f"{name}(sink=...)", normalization.sink, heads, device)]
    if normalization.affine is not None:
        alpha, beta = normalization.affine
        return [_per_head_tensor(f"{name}(alpha=...)", alpha, heads, device),
                _per_head_tensor(f"{name}(beta=...)", beta, heads, device)]
    return []


class CompiledAttention:
    """A spec compiled to Triton kernels; call it like ``attn(q, k, v)``."""

    def __init__(self, spec: AttentionSpec):
        self.spec = spec
        self._build()

    def _build(self) -> None:
        started = time.perf_counter()
        self.expectations = stats_module.kernel_expectations(self.spec.stats)
        self.graph = trace(self.spec.score_mod, self.spec.mask_mod, self.spec.normalization, self.expectations)
        self.signature = self._capture_signature()
        self.description = self.spec.describe()
        identity = "\n".join([self.graph.text(), *self.description, f"compiler {compiler_digest()}",
                              f"triton {triton.__version__}"])
        self.key = hashlib.sha256(identity.encode()).hexdigest()
        self.path, self.cache_hit = cached_source(self.key, self._generate)
        self.compile_seconds = time.perf_counter() - started

    def _capture_signature(self) -> tuple[str, ...]:
        return tuple(c.signature() for c in self.graph.captures)

    def kernel_graph(self):
        """The graph the kernels are generated from: optimized, with gradients and block bounds."""
        from ..ir.passes import block_bounds, optimize  # sympy is only needed to generate

        return block_bounds(optimize(self.graph))

    def _generate(self) -> str:
        return render(self.kernel_graph(), self.description, self.spec.normalization,
                      row_max="max" in self.spec.stats, maps=stats_module.map_stats(self.spec.stats),
                      scale=self.spec.scale)

    @property
    def source(self) -> str:
        """The generated kernel module's Python source."""
        return self.path.read_text()

    def export(self, path) -> Path:
        """Write the standalone kernel module (imports only torch and triton) to ``path``,
        with the tile configurations tuned so far built in."""
        path = Path(path)
        path.write_text(self.source.replace("TUNED_CONFIGS = {}\n", f"TUNED_CONFIGS = {autotune.stored(self.key)!r}\n", 1))
        return path

    def _captures(self, device: torch.device) -> list[torch.Tensor]:
        for i, capture in enumerate(self.graph.captures):
            t = capture.tensor
            if t.device != device:
                raise ValueError(f"captured tensor #{i} (shape {tuple(t.shape)}, dtype {t.dtype}) is on "
                                 f"{t.device} but q is on {device}; move it to {device}")
        return [capture.tensor for capture in self.graph.captures]

    def __call__(self, q, k, v, *, return_stats: bool = False):
        """Attention of q [B,Hq,Lq,Dqk], k [B,Hkv,Lk,Dqk], v [B,Hkv,Lk,Dv] -> [B,Hq,Lq,Dv].

        With ``return_stats=True`` returns ``(out, stats)`` with the spec's
        statistics; ``stats.lse`` is the natural-log sum of exponentials of each
        row's kept logits (and the sink, if any).
        """
        shape = check_inputs(q, k, v, KERNEL_DTYPES)
        if q.device.type not in ("cpu", "cuda"):
            raise ValueError(f"q is on {q.device}; attngen runs on CUDA GPUs and (interpreted) on CPU")
        if self._capture_signature() != self.signature:  # e.g. requires_grad changed since compile
            self._build()
        kernels = load_kernels(self.path, interpret=q.device.type == "cpu")
        params = norm_parameters(self.spec.normalization, shape.q_heads, q.device)
        captures = self._captures(q.device)
        if autotune.enabled(q):
            autotune.ensure_tuned(kernels, self.key, q, k, v, captures, params)
        out, *stats = kernels.attention(q, k, v, captures, params)
        if not return_stats:
            return out
        outputs = dict(zip(kernels.STAT_OUTPUTS, stats))
        expectations = {name: outputs["expectations"][e] for e, (name, _) in enumerate(self.expectations)}
        maps = {stat.name: outputs[f"map{m}"] for m, stat in enumerate(stats_module.map_stats(self.spec.stats))}
        return out, stats_module.assemble(self.spec.stats, outputs.get("lse"), outputs.get("max"), expectations, maps)


def compile(spec: AttentionSpec) -> CompiledAttention:  # noqa: A001 - public API name
    """Compile ``spec``; the generated module is cached on disk by the spec's IR."""
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"compile() takes an attngen.AttentionSpec, got {type(spec).__name__}")
    return CompiledAttention(spec)


def attention(q, k, v, score_mod=None, mask_mod=None, *, scale=None, return_stats: bool = False):
    """One-call form, like ``flex_attention(q, k, v, score_mod=..., block_mask=...)``."""
    spec = AttentionSpec(score_mod=score_mod, mask_mod=mask_mod, scale=scale)
    return compile(spec)(q, k, v, return_stats=return_stats)
