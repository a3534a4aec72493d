"""``compile(spec)``: trace, optimize, generate (or load from cache) and wrap."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
import warnings
from pathlib import Path

import torch
import triton

from .. import stats as stats_module
from ..codegen.render import EntryPoint, compiler_digest, render
from ..blocks import BlockMask, block_size_pair, flex_block_mask, flex_mask_mod
from ..errors import user_stacklevel
from ..index_checks import check_index_ranges, check_sequence_reads
from ..inputs import method_under_autocast
from ..ir.graph import Capture
from ..linear import LinearAttentionSpec
from ..norms import WEIGHT_FAMILIES
from ..qkv import check_entmax_alpha, per_head_tensor
from ..scalars import sizes
from ..spec import AttentionSpec
from ..trace import trace
from . import autotune, calls, plan, tracing
from .cache import cached_source
from .index_ranges import index_reads
from .linear import CompiledLinearAttention
from .loader import load_kernels
from .variants import CALLS, KERNEL_CAPTURES, Variant


def _norm_parameters(spec: AttentionSpec) -> list[tuple[str, object]]:
    """The per-head parameters of the kernels as the spec holds them (numbers or tensors), each with the
    name an error gives it: a sink, an affine output's alpha and beta, entmax's alpha, or differential
    attention's lambda (in the generated module's NORM_PARAMETERS order)."""
    normalization = spec.normalization
    name = type(normalization).__name__
    found = []
    if normalization.sink is not None:
        found.append((f"{name}(sink=...)", normalization.sink))
    if normalization.affine is not None:
        alpha, beta = normalization.affine
        found += [(f"{name}(alpha=...)", alpha), (f"{name}(beta=...)", beta)]
    if normalization.family == "threshold" and normalization.per_head:
        found.append((f"{name}(alpha=...)", normalization.alpha))
    if spec.differential is not None:
        found.append(("differential", spec.differential))
    return found


def per_head_parameters(spec: AttentionSpec, heads: int, device: torch.device) -> list[torch.Tensor]:
    """The per-head float32 [heads] tensors the kernels take (see :func:`_norm_parameters`)."""
    parameters = _norm_parameters(spec)
    found = [per_head_tensor(name, value, heads, device) for name, value in parameters]
    if spec.normalization.family == "threshold" and spec.normalization.per_head:  # entmax's alpha, its only one
        check_entmax_alpha(parameters[0][0], found[0])
    return found


_SOFT_MASK = -1e4  # a score this low, set by torch.where, is a mask written as a number


def _warn_of_soft_masks(graph, spec: AttentionSpec) -> None:
    """Warn where score_mod drops keys with a large finite negative score (``torch.where(keep, s, -1e9)``,
    ``torch.finfo(s.dtype).min``): a row whose every key gets it has weights 1 / n, as in torch, but at
    that magnitude float32's lse rounds log(n) away, so its gradients are off (by up to n times)."""
    if spec.normalization.family in WEIGHT_FAMILIES or spec.normalization.family == "stick_breaking":
        return
    outputs = [graph.outputs[name] for name in ("score", "score2") if name in graph.outputs]
    values = sorted({graph.node(a)["value"] for n in graph.order(outputs) if graph.op(n) == "where"
                     for a in graph.args(n)[1:] if graph.is_const(a) and graph.dtype(a) == "float"
                     and -math.inf < graph.node(a)["value"] <= _SOFT_MASK})
    if values:
        warnings.warn(f"score_mod sets scores to {values[0]:g} with torch.where: where a row's every key gets it, "
                      "float32's log-sum-exp rounds log(n) away at that magnitude (its gradients are then wrong); "
                      "drop keys with float('-inf') or mask_mod instead, which the kernels skip exactly (a row with "
                      "no key left gives 0)", stacklevel=user_stacklevel())


class CompiledAttention:
    """A spec compiled to Triton kernels; call it like ``attn(q, k, v)``."""

    def __init__(self, spec: AttentionSpec, variant: Variant = Variant()):
        self.spec = spec
        self.variant = variant
        self.stand_ins = variant.stand_ins()  # captured placeholders for a call's own tensors
        if spec.top_k is not None:  # each row's cut-off, which the generated forward computes itself
            self.stand_ins["topk_floor"] = torch.zeros(1, 1, 1)
        self._variants: dict[Variant, CompiledAttention] = {}
        self._build()
        self._traced_name = tracing.register(self)

    def _build(self) -> None:
        started = time.perf_counter()
        self._plan_graph = None
        traced, key_count = self.variant.rewrite(self.spec, self.stand_ins)
        self.graph = self._trace(traced, key_count)
        self.expectations = stats_module.kernel_expectations(traced.stats, self.spec.normalization)
        self.index_reads = index_reads(self.graph)
        # packed sequences: the mods' own reads, at positions within each sequence (which the rewritten
        # graph computes from the call's tensors, beyond what its reads can bound), of their own captures
        # (``sequence_captures``: their places among the rewritten graph's)
        sequence_graph = self._trace(self.spec, None) if self.variant.packed else None
        self.sequence_reads = index_reads(sequence_graph) if sequence_graph else []
        places = {id(c.tensor): i for i, c in enumerate(self.graph.captures)}
        self.sequence_captures = [places[id(c.tensor)] for c in sequence_graph.captures] if sequence_graph else []
        if self.variant == Variant():
            _warn_of_soft_masks(self.graph, self.spec)
        for name in KERNEL_CAPTURES:  # stand-ins the kernels read themselves: after the mods' captures
            if name in self.stand_ins:
                self.graph.captures.append(Capture(self.stand_ins[name]))
        # where the call's own tensors go among the captured ones (a stand-in the mods do not read is not)
        self.call_captures = {name: i for i, c in enumerate(self.graph.captures)
                              for name, stand_in in self.stand_ins.items() if c.tensor is stand_in}
        self.signature = self._capture_signature()
        self.description = self.spec.describe() + \
            ([f"call variant: {self.variant.describe()}"] if self.variant != Variant() else [])
        identity = "\n".join([self.graph.text(), *self.signature, *self.description, f"compiler {compiler_digest()}",
                              f"triton {triton.__version__}"])
        self.key = hashlib.sha256(identity.encode()).hexdigest()
        self.path, self.cache_hit = cached_source(self.key, self._generate)
        self.compile_seconds = time.perf_counter() - started

    def _trace(self, spec: AttentionSpec, key_count):
        """The graph of ``spec``'s mods (this spec's, or rewritten for the call variant) and statistics."""
        expectations = stats_module.kernel_expectations(spec.stats, self.spec.normalization)
        return trace(spec.score_mod, spec.mask_mod, self.spec.normalization, expectations, key_count,
                     second_score_mod=spec.second_score_mod if self.spec.differential is not None else None,
                     two_streams=self.spec.differential is not None,
                     logit=self.spec.normalization.family in WEIGHT_FAMILIES
                     and ("max" in self.spec.stats or bool(expectations)))

    def _capture_signature(self) -> tuple[str, ...]:
        """What the generated code depends on besides the spec's text: each capture's kind and
        whether a gradient flows to it or to the sink."""
        sink = ("learnable sink",) if self.spec.normalization.learnable_sink else ()
        return tuple(c.signature() for c in self.graph.captures) + sink

    def kernel_graph(self):
        """The graph the kernels are generated from: optimized, with gradients and the mask plan."""
        if self._plan_graph is None:
            from ..ir.passes import mask_plan, optimize  # sympy is only needed to generate

            self._plan_graph = mask_plan(optimize(self.graph))
        return self._plan_graph

    def _generate(self) -> str:
        return render(self.kernel_graph(), self.description, self.spec.normalization,
                      row_max="max" in self.spec.stats, support="support" in self.spec.stats,
                      entropy="entropy" in self.spec.stats,
                      maps=stats_module.map_stats(self.spec.stats),
                      scale=self.spec.scale, split_kv=self.variant.split_kv,
                      call_captures=self.call_captures, differential=self.spec.differential is not None,
                      cache=self.variant.cache, top_k=self.spec.top_k, entry_point=self.entry_point)

    @property
    def entry_point(self) -> EntryPoint:
        """How the generated module's ``forward`` takes this kind of call."""
        variant = self.variant
        defaults = tuple(None if isinstance(value, torch.Tensor) else float(value)
                         for _, value in _norm_parameters(self.spec))
        return EntryPoint(variant.cache, variant.paged, variant.packed, variant.dropout, self.spec.dropout_p,
                          variant.block_size, tuple(self.index_reads), tuple(self.sequence_reads),
                          tuple(self.sequence_captures), defaults)

    def exported_tensors(self, device=None) -> list[torch.Tensor]:
        """The tensors an exported module's ``forward`` takes after q, k and v, in its order: the spec's
        captured tensors (in the order its mods first read them), then the normalization's per-head
        parameters (NORM_PARAMETERS; a number as a 0-d float32 tensor on ``device``)."""
        own = [c.tensor for i, c in enumerate(self.graph.captures) if i not in self.call_captures.values()]
        return own + [value if isinstance(value, torch.Tensor) else torch.tensor(float(value), device=device)
                      for _, value in _norm_parameters(self.spec)]

    @property
    def source(self) -> str:
        """The generated kernel module's Python source."""
        return self.path.read_text()

    def export(self, path, call: str | None = None) -> Path:
        """Write the standalone kernel module (imports only torch and triton) of this spec's calls of kind
        ``call`` to ``path``, with the tile configurations tuned so far built in: ``"plain"``, ``"cache"``
        (on a KV cache: its entry point takes kv_lens and q_offset), ``"decode"`` (the same, split-KV),
        ``"paged"`` (decoding from a paged cache, forward only), ``"packed"`` (packed sequences: it takes
        cu_seqlens_q and cu_seqlens_k) or ``"dropout"`` (it takes dropout_p and seed); None: this object's
        own kind. Calls with a block mask: ``attn.with_block_mask(block_size).export(path, call=...)``."""
        if call is not None:
            if call not in CALLS:
                raise ValueError(f"call must be one of {', '.join(map(repr, CALLS))}, got {call!r}")
            variant = dataclasses.replace(CALLS[call], block_size=self.variant.block_size)
            return self.for_call(variant).export(path)
        if self.variant.packed:
            calls.check_packable(self.spec)
        path = Path(path)
        tuned = f"TUNED_CONFIGS = {autotune.stored(self.key)!r}\n"
        path.write_text(self.source.replace("TUNED_CONFIGS = {}\n", tuned, 1))
        return path

    def _captures(self, device: torch.device, tensors: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The captured tensors as a call passes them: ``tensors`` (by name) in the stand-ins' places."""
        by_stand_in = {id(self.stand_ins[name]): (name, t) for name, t in (tensors or {}).items()}
        found = []
        for i, capture in enumerate(self.graph.captures):
            unnamed = f"captured tensor #{i} (shape {tuple(capture.tensor.shape)}, dtype {capture.tensor.dtype})"
            name, t = by_stand_in.get(id(capture.tensor), (unnamed, capture.tensor))
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but q is on {device}; move it to {device}")
            found.append(t)
        return found

    def build_for_call(self, call: str, device: torch.device) -> None:
        """Build and import the kernels of a call of kind ``call`` (:meth:`Variant.encode`) on
        ``device``: what a call traced by torch.compile cannot do itself (see :mod:`.tracing`)."""
        self.for_call(Variant.decode(call))._kernels(device)

    def __reduce__(self):
        """Pickles as its spec (with module-level mods), compiled again when loaded (from the disk cache)."""
        return CompiledAttention, (self.spec, self.variant)

    def __repr__(self) -> str:
        return f"CompiledAttention({', '.join(self.description)}; {self.path})"

    def __deepcopy__(self, memo):
        """A copy of all it holds, not a recompiled spec: the tensors its graph captured (through a closure
        too, which deepcopy does not copy) become the copies made by the same deepcopy, e.g. a copied
        module's buffers."""
        copied = memo[id(self)] = object.__new__(CompiledAttention)
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def for_call(self, variant: Variant) -> CompiledAttention:
        """This spec compiled for a kind of call (see :mod:`attngen.runtime.variants`), once per variant.
        Sparsemax and entmax never split a row's keys (their threshold needs passes over the whole row):
        their split-KV calls run the unsplit kernels."""
        if variant.packed and variant.block_size is not None:
            raise ValueError("packed sequences cannot be combined with a block mask")
        if variant.split_kv and self.spec.normalization.family == "threshold":
            variant = dataclasses.replace(variant, split_kv=False)
        if variant == self.variant:
            return self
        if variant not in self._variants:
            self._variants[variant] = CompiledAttention(self.spec, variant)
        return self._variants[variant]

    def with_block_mask(self, block_size: int | tuple[int, int]) -> CompiledAttention:
        """This spec's plain calls with a block mask of ``block_size`` (an int, or a pair (block_q, block_k))
        anded to its mask_mod: what ``attn(q, k, v, block_mask=...)`` runs; its ``export`` writes their
        kernels."""
        return self.for_call(Variant(block_size=block_size_pair(block_size)))

    def block_stats(self, q_len: int, kv_len: int, batch: int = 1, heads: int = 1, *, block_m: int | None = None,
                    block_n: int | None = None, device=None, **call) -> dict[str, int]:
        """How the forward kernel treats its (q tile, kv tile) pairs for these sizes and the captured
        tensors as they are now: counts ``{"total", "empty", "full", "partial"}`` over every batch and
        head. Empty tiles are skipped, full ones run without evaluating mask_mod. Tiles are the kernel's
        untuned default on ``device`` (the captured tensors' device, else CPU; on CUDA the one for 16-bit
        inputs of head dim 64) unless ``block_m``/``block_n`` say. ``call`` takes the keyword arguments of
        a call (block_mask, kv_lens, q_offset, cu_seqlens_q/k; packed: lengths are token counts)."""
        return plan.block_counts(*self.tile_plan(q_len, kv_len, batch, heads, block_m=block_m, block_n=block_n,
                                                 device=device, **call))

    def tile_plan(self, q_len: int, kv_len: int, batch: int = 1, heads: int = 1, *, block_m: int | None = None,
                  block_n: int | None = None, device=None, **call):
        """Per tile, what :meth:`block_stats` counts: bool tensors ``(visited, full)`` of shape
        ``[batch, heads, q tiles, kv tiles]``."""
        q_len, kv_len, batch = sizes("tile_plan", 0, q_len=q_len, kv_len=kv_len, batch=batch)
        [heads] = sizes("tile_plan", 1, heads=heads)
        given = {name: size for name, size in (("block_m", block_m), ("block_n", block_n)) if size is not None}
        tiles = dict(zip((name.upper() for name in given), sizes("tile_plan", 1, **given)))
        captures = [c.tensor for c in self.graph.captures]
        device = torch.device(device or (captures[0].device if captures else "cpu"))
        packed = call.get("cu_seqlens_q") is not None
        shapes = ((q_len, heads), (kv_len, heads)) if packed else ((batch, heads, q_len), (batch, heads, kv_len))
        q, k = (torch.empty(*shape, 1, device=device) for shape in shapes)
        prepared = calls.prepare(self.spec, q, k, k, **call)
        attn = self.for_call(prepared.variant)
        kernels = load_kernels(attn.path, interpret=True)
        example = torch.empty(0, 0, 0, 64, dtype=torch.bfloat16, device="meta")
        config = {**kernels.default_config(example, example, example, device.type), **tiles}
        tensors = kernels.prepare_captures(attn._captures(device, prepared.tensors))
        shape = prepared.shape
        return plan.tile_states(attn.kernel_graph(), kernels, tensors, shape.batch, shape.q_heads, shape.q_len,
                                shape.kv_len, config)

    @method_under_autocast
    def __call__(self, q, k, v, *, block_mask=None, kv_lens=None, q_offset=None, block_table=None,
                 cu_seqlens_q=None, cu_seqlens_k=None, mode: str | None = None, dropout_p: float | None = None,
                 seed: int | None = None, return_stats: bool = False):
        """Attention of q [B,Hq,Lq,Dqk], k [B,Hkv,Lk,Dqk], v [B,Hkv,Lk,Dv] -> [B,Hq,Lq,Dv].

        ``block_mask`` (an :class:`attngen.BlockMask`, a bool block matrix
        ``[B|1, Hq|1, nq, nk]`` of ``Lq/nq x Lk/nk`` blocks (the counts dividing the lengths), or a
        FlexAttention ``BlockMask`` whose mask_mod is the spec's or the no-op)
        limits attention to its kept blocks, on top of the spec's mask_mod.
        ``kv_lens`` ([B] ints): k and v are caches holding ``kv_lens[b]`` keys for
        batch entry ``b``; ``q_offset`` (int or [B]; default ``kv_lens - Lq``, the
        queries being the last tokens) places query ``i`` at ``i + q_offset[b]``
        for the mods. With ``block_table`` ([B, max_pages] ints), k and v are
        pages ``[num_pages, Hkv, page_size, D]`` of a paged cache (forward only).
        ``cu_seqlens_q`` / ``cu_seqlens_k`` ([B + 1] cumulative
        lengths): q ``(tokens, Hq, Dqk)``, k and v ``(tokens, Hkv, D)`` hold packed
        sequences that attend within themselves; the mods see the sequence as
        ``b`` and positions within it; out is ``(tokens, Hq, Dv)`` and row
        statistics ``[Hq, tokens]``; jagged nested q, k, v ``[B, H, j, D]`` (SDPA's layout) are packed
        sequences with their offsets as cu_seqlens, and out is nested too. ``mode="decode"`` splits each
        row's keys over several programs and merges them (split-KV), ``"prefill"`` never does; by
        default CUDA calls with at most 16 queries and at least 1024 keys do.
        ``dropout_p`` (default: the spec's) drops normalized weights with that
        probability, from ``seed`` (default: drawn from torch's generator); the
        backward pass regenerates the same mask.
        With ``return_stats=True`` returns ``(out, stats)`` with the spec's
        statistics; ``stats.lse`` is the natural-log sum of exponentials of each
        row's kept logits (and the sink, if any).
        """
        call = calls.prepare(self.spec, q, k, v, block_mask=block_mask, kv_lens=kv_lens, q_offset=q_offset,
                             block_table=block_table, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                             mode=mode, dropout_p=dropout_p, seed=seed)
        tracing.ready(call.q, self._traced_name, call.variant.encode())
        out, stats = self.for_call(call.variant)._run(call.q, call.k, call.v, call.shape, call.tensors)
        return call.finish(out, stats if return_stats else None)

    def dropout_keep(self, batch: int, heads: int, q_len: int, kv_len: int, dropout_p: float, seed: int,
                     device="cpu") -> torch.Tensor:
        """For tests: the dropout mask ``[batch, heads, q_len, kv_len]`` (True: kept) that a dense call
        with this ``dropout_p`` and ``seed`` applies."""
        kernels = self.for_call(Variant(dropout=True))._kernels(torch.device(device))
        keep = torch.zeros((batch, heads, q_len, kv_len), dtype=torch.int8, device=device)
        return kernels.dropout_keep(keep, seed, dropout_p).bool()

    def _kernels(self, device: torch.device):
        """The kernel module for ``device``, rebuilt first if the captured tensors changed kind."""
        if self._capture_signature() != self.signature:  # e.g. requires_grad changed since compile
            self._build()
        return load_kernels(self.path, interpret=device.type == "cpu")

    def _check_index_ranges(self, shape, captures: list[torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
        """Raise where a captured tensor of ``captures`` (as :meth:`_captures` passes them) is too small for
        a read indexed with ``b``, ``h``, ``q_idx``, ``kv_idx`` or an affine expression of them (see
        index_ranges); under a KV cache the mods' query positions ``q_idx + q_offset[b]`` take the call's
        offsets (a device read where a read depends on them); with packed sequences the spec's own reads are
        checked at positions within the longest sequence (a device read)."""
        extents = {"h": shape.q_heads}
        if not self.variant.packed:
            extents.update(b=shape.batch, q_idx=shape.q_len, kv_idx=shape.kv_len)
        check_index_ranges(captures, self.index_reads, extents, self.call_captures)
        if self.variant.packed:
            check_sequence_reads([captures[i] for i in self.sequence_captures], self.sequence_reads, tensors,
                                 shape.q_heads, shape.q_len)

    def _run(self, q, k, v, shape, tensors: dict[str, torch.Tensor]):
        """(out, Stats) of the kernels on dense q, k, v with the call's stand-in replacements."""
        captures = self._captures(q.device, tensors)
        self._check_index_ranges(shape, captures, tensors)
        kernels = self._kernels(q.device)
        params = per_head_parameters(self.spec, shape.q_heads, q.device)
        if autotune.enabled(q):
            autotune.ensure_tuned(kernels, self.key, q, k, v, captures, params)
        out, *stats = kernels.attention(q, k, v, captures, params)
        outputs = dict(zip(kernels.STAT_OUTPUTS, stats))
        expectations = {name: outputs["expectations"][e] for e, (name, _) in enumerate(self.expectations)}
        maps = {stat.name: outputs[f"map{m}"] for m, stat in enumerate(stats_module.map_stats(self.spec.stats))}
        return out, stats_module.assemble(self.spec.stats, outputs.get("lse"), outputs.get("max"), expectations, maps,
                                          outputs.get("support"), self.spec.normalization.sink, outputs.get("entropy"))


def compile(spec: AttentionSpec | LinearAttentionSpec):  # noqa: A001 - public API name
    """Compile ``spec`` (a :class:`CompiledAttention`, or a :class:`CompiledLinearAttention` for a
    :class:`~attngen.LinearAttentionSpec`); the generated module is cached on disk by the spec's IR."""
    if isinstance(spec, LinearAttentionSpec):
        return CompiledLinearAttention(spec)
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"compile() takes an attngen.AttentionSpec or LinearAttentionSpec, got {type(spec).__name__}")
    return CompiledAttention(spec)


def attention(q, k, v, score_mod=None, mask_mod=None, *, scale=None, return_stats: bool = False,
              return_lse: bool = False, return_aux=None, enable_gqa: bool = True, kernel_options=None, **call):
    """One-call form, like ``flex_attention(q, k, v, score_mod=..., block_mask=...)``; ``call`` takes the
    keyword arguments of :meth:`CompiledAttention.__call__` (block_mask, kv_lens, q_offset, block_table,
    cu_seqlens_q/k, mode, dropout_p, seed). As in FlexAttention, a FlexAttention ``BlockMask`` given as
    ``block_mask`` supplies its mask_mod (unless ``mask_mod`` is given); ``return_lse=True`` returns
    ``(out, lse)`` and ``return_aux=AuxRequest(lse=..., max_scores=...)`` returns ``(out, AuxOutput)``
    (max_scores: each row's largest score after score_mod, the "max" statistic). ``enable_gqa`` is True
    by default (query heads may be a multiple of the kv heads); ``enable_gqa=False`` refuses unequal head
    counts, as FlexAttention does. ``kernel_options``, FlexAttention's tile sizes and kernel switches,
    changes no result: it is ignored with a warning (attngen tunes its own tiles per shape bucket)."""
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict (FlexAttention's), got {type(kernel_options).__name__}")
    if kernel_options:
        warnings.warn(f"kernel_options {sorted(kernel_options)} are FlexAttention's tile sizes and kernel switches; "
                      "attngen tunes its own tiles for each shape bucket and ignores them",
                      stacklevel=user_stacklevel())
    if isinstance(mask_mod, BlockMask) or flex_block_mask(mask_mod) is not None:
        raise TypeError("ag.attention's fifth argument is mask_mod; pass a block mask as block_mask=... "
                        "(flex_attention's fifth argument is its block mask)")
    if not enable_gqa and all(isinstance(t, torch.Tensor) and t.dim() >= 3 for t in (q, k)) \
            and q.shape[1] != k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads and k {k.shape[1]}: pass enable_gqa=True for grouped-query "
                         "attention (query heads a multiple of the kv heads), as flex_attention wants")
    if sum((return_stats, return_lse, return_aux is not None)) > 1:
        raise ValueError("pass one of return_stats=True (out, stats), return_lse=True (out, lse) or "
                         "return_aux=AuxRequest(...) (out, AuxOutput)")
    flex = flex_block_mask(call.get("block_mask"))
    if mask_mod is None and flex is not None:
        mask_mod = flex_mask_mod(flex)
    requested = None if return_aux is None else \
        ("lse",) * bool(return_aux.lse) + ("max",) * bool(return_aux.max_scores)  # None: the default, lse
    attn = compile(AttentionSpec(score_mod=score_mod, mask_mod=mask_mod, scale=scale, stats=requested))
    if not (return_lse or return_aux is not None):
        return attn(q, k, v, return_stats=return_stats, **call)
    out, stats = attn(q, k, v, return_stats=True, **call)  # FlexAttention's spellings of return_stats=True
    if return_lse:
        return out, stats.lse
    from torch.nn.attention.flex_attention import AuxOutput
    return out, AuxOutput(lse=stats.lse if return_aux.lse else None,
                          max_scores=stats.max if return_aux.max_scores else None)
