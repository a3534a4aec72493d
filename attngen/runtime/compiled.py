"""``compile(spec)``: trace, optimize, generate (or load from cache) and wrap."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import torch
import triton

from .. import stats as stats_module
from ..blocks import as_block_mask, blocks_mask_mod
from ..codegen.render import compiler_digest, render
from ..inputs import KERNEL_DTYPES, check_inputs
from ..spec import AttentionSpec
from ..trace import trace
from . import autotune, plan
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

    def __init__(self, spec: AttentionSpec, block_placeholder: torch.Tensor | None = None):
        self.spec = spec
        self.block_placeholder = block_placeholder  # the captured stand-in for a call's block mask
        self._with_blocks: dict[tuple[int, int], CompiledAttention] = {}
        self._build()

    def _build(self) -> None:
        started = time.perf_counter()
        self._plan_graph = None
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
        """The graph the kernels are generated from: optimized, with gradients and the mask plan."""
        if self._plan_graph is None:
            from ..ir.passes import mask_plan, optimize  # sympy is only needed to generate

            self._plan_graph = mask_plan(optimize(self.graph))
        return self._plan_graph

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

    def _captures(self, device: torch.device, blocks: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The captured tensors as this call passes them (``blocks`` in the block-mask stand-in's place)."""
        tensors = [blocks if c.tensor is self.block_placeholder else c.tensor for c in self.graph.captures]
        for i, t in enumerate(tensors):
            if t.device != device:
                name = "block_mask" if t is blocks else f"captured tensor #{i} (shape {tuple(t.shape)}, dtype {t.dtype})"
                raise ValueError(f"{name} is on {t.device} but q is on {device}; move it to {device}")
        return tensors

    def with_block_mask(self, block_size: tuple[int, int]) -> CompiledAttention:
        """This spec with a call-time block mask of ``block_size`` anded to its mask_mod (compiled once per size)."""
        if self.block_placeholder is not None:
            return self
        if block_size not in self._with_blocks:
            placeholder = torch.zeros(1, 1, 1, 1, dtype=torch.bool)
            in_kept_block = blocks_mask_mod(placeholder, block_size)
            user_mask = self.spec.mask_mod
            mask_mod = in_kept_block if user_mask is None else \
                (lambda b, h, q_idx, kv_idx: user_mask(b, h, q_idx, kv_idx) & in_kept_block(b, h, q_idx, kv_idx))
            spec = dataclasses.replace(self.spec, mask_mod=mask_mod)
            self._with_blocks[block_size] = CompiledAttention(spec, block_placeholder=placeholder)
        return self._with_blocks[block_size]

    def block_stats(self, q_len: int, kv_len: int, batch: int = 1, heads: int = 1, *, block_mask=None,
                    block_m: int | None = None, block_n: int | None = None, device=None) -> dict[str, int]:
        """How the forward kernel treats its (q tile, kv tile) pairs for these sizes and the captured
        tensors as they are now: counts ``{"total", "empty", "full", "partial"}`` over every batch and
        head. Empty tiles are skipped, full ones run without evaluating mask_mod. Tiles are the kernel's
        untuned default on ``device`` (the captured tensors' device, else CPU; on CUDA the one for 16-bit
        inputs of head dim 64) unless ``block_m``/``block_n`` say."""
        return plan.block_counts(*self.tile_plan(q_len, kv_len, batch, heads, block_mask=block_mask,
                                                 block_m=block_m, block_n=block_n, device=device))

    def tile_plan(self, q_len: int, kv_len: int, batch: int = 1, heads: int = 1, *, block_mask=None,
                  block_m: int | None = None, block_n: int | None = None, device=None):
        """Per tile, what :meth:`block_stats` counts: bool tensors ``(visited, full)`` of shape
        ``[batch, heads, q tiles, kv tiles]``."""
        captures = [c.tensor for c in self.graph.captures]
        device = torch.device(device or (captures[0].device if captures else "cpu"))
        attn, blocks = self, None
        if block_mask is not None:
            user_blocks = as_block_mask(block_mask, q_len, kv_len)
            attn = self.with_block_mask(user_blocks.block_size)
            blocks = user_blocks.dense(batch, heads, q_len, kv_len).to(device)
        kernels = load_kernels(attn.path, interpret=True)
        example = torch.empty(0, 64, dtype=torch.bfloat16, device="meta")
        config = {**kernels.default_config(example, example, device.type),
                  **{k: v for k, v in (("BLOCK_M", block_m), ("BLOCK_N", block_n)) if v is not None}}
        tensors = kernels.prepare_captures(attn._captures(device, blocks))
        return plan.tile_states(attn.kernel_graph(), kernels, tensors, batch, heads, q_len, kv_len, config)

    def __call__(self, q, k, v, *, block_mask=None, return_stats: bool = False):
        """Attention of q [B,Hq,Lq,Dqk], k [B,Hkv,Lk,Dqk], v [B,Hkv,Lk,Dv] -> [B,Hq,Lq,Dv].

        ``block_mask`` (an :class:`attngen.BlockMask` or a bool block matrix
        ``[B|1, Hq|1, nq, nk]`` of ``ceil(Lq/nq) x ceil(Lk/nk)`` blocks) limits
        attention to its True blocks, on top of the spec's mask_mod. With
        ``return_stats=True`` returns ``(out, stats)`` with the spec's
        statistics; ``stats.lse`` is the natural-log sum of exponentials of each
        row's kept logits (and the sink, if any).
        """
        shape = check_inputs(q, k, v, KERNEL_DTYPES)
        if q.device.type not in ("cpu", "cuda"):
            raise ValueError(f"q is on {q.device}; attngen runs on CUDA GPUs and (interpreted) on CPU")
        if block_mask is not None and self.block_placeholder is None:
            blocks = as_block_mask(block_mask, shape.q_len, shape.kv_len)
            dense = blocks.dense(shape.batch, shape.q_heads, shape.q_len, shape.kv_len)
            return self.with_block_mask(blocks.block_size)._run(q, k, v, shape, dense, return_stats)
        return self._run(q, k, v, shape, None, return_stats)

    def _run(self, q, k, v, shape, blocks, return_stats: bool):
        if self._capture_signature() != self.signature:  # e.g. requires_grad changed since compile
            self._build()
        kernels = load_kernels(self.path, interpret=q.device.type == "cpu")
        params = norm_parameters(self.spec.normalization, shape.q_heads, q.device)
        captures = self._captures(q.device, blocks)
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


def attention(q, k, v, score_mod=None, mask_mod=None, *, block_mask=None, scale=None, return_stats: bool = False):
    """One-call form, like ``flex_attention(q, k, v, score_mod=..., block_mask=...)``."""
    spec = AttentionSpec(score_mod=score_mod, mask_mod=mask_mod, scale=scale)
    return compile(spec)(q, k, v, block_mask=block_mask, return_stats=return_stats)
