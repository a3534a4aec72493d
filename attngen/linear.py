"""``LinearAttentionSpec``: causal linear attention with an optional decay.

    o_i = sum_{j <= i} gamma_ij (phi(q_i) * scale) . phi(k_j) v_j  /  (n_i + eps)
    n_i = sum_{j <= i} gamma_ij (phi(q_i) * scale) . phi(k_j)        (with normalize=True)

``gamma_ij = exp(G_i - G_j)`` where ``G`` is the running sum of per-token log
decays: none (``gamma = 1``, Katharopoulos et al. 2020), a fixed per-head
``gamma ** (i - j)`` (RetNet, Lightning Attention) or data-dependent gates
passed with each call (``decay="gated"``: GLA / Mamba-2-style scalar gates).
The feature map ``phi`` is traced like a score_mod, so a user's own
elementwise function compiles (and differentiates) too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .errors import SpecError
from .scalars import real
from .spec import _check_arity, _show, _source


def elu_plus_one(x):
    """``elu(x) + 1``: positive features (Katharopoulos et al. 2020)."""
    return torch.where(x > 0, x + 1.0, torch.exp(x))


def identity(x):
    """No feature map: ``phi(x) = x`` (RetNet, Lightning Attention)."""
    return x


FEATURE_MAPS: dict[str, Callable] = {"elu+1": elu_plus_one, "relu": torch.relu, "identity": identity}


class LinearState(NamedTuple):
    """The recurrent state after a sequence, per query head (float32): ``kv`` [B, Hq, Dqk, Dv] is
    ``sum_j gamma_j phi(k_j) v_j^T`` and ``n`` [B, Hq, Dqk] is ``sum_j gamma_j phi(k_j)``."""

    kv: torch.Tensor
    n: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, heads: int, qk_dim: int, v_dim: int, device="cpu",
              dtype=torch.float32) -> "LinearState":
        """The state before any token."""
        return cls(torch.zeros(batch, heads, qk_dim, v_dim, device=device, dtype=dtype),
                   torch.zeros(batch, heads, qk_dim, device=device, dtype=dtype))


def _gated(decay) -> bool:
    return isinstance(decay, str) and decay == "gated"


def _check_decay(decay):
    """``decay`` as the spec keeps it (a number as a Python one), or a SpecError."""
    if decay is None or _gated(decay):
        return decay
    if isinstance(decay, str):
        raise SpecError(f"decay must be None, a float in (0, 1], a per-head tensor or 'gated', got {decay!r}")
    if real(decay) is None and not isinstance(decay, torch.Tensor):
        raise SpecError(f"decay must be None, a float in (0, 1], a per-head tensor or 'gated', "
                        f"got {type(decay).__name__}")
    if isinstance(decay, torch.Tensor):
        if not decay.is_floating_point() or decay.dim() > 1:
            raise SpecError(f"a decay tensor must be floating-point with one entry per query head, got a "
                            f"{decay.dtype} tensor of shape {tuple(decay.shape)}")
        values = decay.detach()
        if not bool(((values > 0) & (values <= 1)).all()):
            raise SpecError(f"decay values must be in (0, 1], got {values.tolist()}")
        return decay
    if not 0 < decay <= 1:
        raise SpecError(f"decay must be in (0, 1], got {decay}")
    return real(decay)


@dataclass(frozen=True)
class LinearAttentionSpec:
    """A linear attention variant: causal (q and k of the same length) unless ``causal=False``.

    Args:
        feature_map: ``"elu+1"``, ``"relu"``, ``"identity"`` or a function ``phi(x)`` of one value,
            traced like a score_mod (torch functions on it, no captured tensors).
        decay: ``None``; a float ``gamma`` in (0, 1] or a tensor of one per query head (learnable with
            ``requires_grad``): weight ``gamma ** (i - j)``; or ``"gated"``: each call passes
            ``log_decay`` [B, Hq, L] (<= 0), and key j reaches query i with ``exp(sum_{j < t <= i} log_decay_t)``.
        normalize: divide by the normalizer ``n_i`` (+ ``eps``); False returns the raw sums.
        causal: False lets every query see every key (no decay then; q and k may differ in length):
            two matrix products, ``phi(q) (phi(k)^T v)``, which torch runs as they are.
        scale: multiplies ``phi(q)``; ``None`` means ``1 / sqrt(Dqk)``.
        eps: added to the normalizer.
    """

    feature_map: str | Callable = "elu+1"
    decay: float | torch.Tensor | str | None = None
    normalize: bool = True
    scale: float | None = None
    eps: float = 1e-6
    causal: bool = True

    def __post_init__(self):
        if isinstance(self.feature_map, str):
            if self.feature_map not in FEATURE_MAPS:
                raise SpecError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a function phi(x), "
                                f"got {self.feature_map!r}")
        else:
            _check_arity(self.feature_map, "feature_map", ("x",))
        object.__setattr__(self, "decay", _check_decay(self.decay))
        for name in ("normalize", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self.causal and self.decay is not None:
            raise SpecError("decay needs causal=True: it weights key j by how far before query i it is")
        for name, value in (("scale", self.scale), ("eps", self.eps)):
            if value is None and name == "scale":
                continue
            if real(value) is None or not math.isfinite(value) or value < 0 or (name == "scale" and value == 0):
                raise SpecError(f"{name} must be a {'positive' if name == 'scale' else 'non-negative'} finite "
                                f"number, got {value!r}")
            object.__setattr__(self, name, real(value))

    @property
    def phi(self) -> Callable:
        """The feature map as a function (of tensors or traced values)."""
        return FEATURE_MAPS[self.feature_map] if isinstance(self.feature_map, str) else self.feature_map

    @property
    def fixed_log_decay(self) -> float | None:
        """Each token's log decay where the spec fixes it (0.0 without decay); None for a learnable or gated one."""
        if self.decay is None:
            return 0.0
        return None if _gated(self.decay) or isinstance(self.decay, torch.Tensor) else math.log(self.decay)

    def scale_for(self, qk_dim: int) -> float:
        """The scale of ``phi(q)`` for head dim ``qk_dim``."""
        return 1.0 / math.sqrt(qk_dim) if self.scale is None else float(self.scale)

    def log_decays(self, batch: int, heads: int, length: int, device, log_decay=None,
                   dtype=torch.float32) -> torch.Tensor:
        """The per-token log decays ``[batch, heads, length]`` (contiguous, autograd-connected to a
        learnable decay or to the call's ``log_decay``)."""
        size = (batch, heads, length)
        if _gated(self.decay):
            if log_decay is None:
                raise ValueError("this spec has decay='gated': pass log_decay= [batch, heads, seq_len] (<= 0)")
            if not isinstance(log_decay, torch.Tensor) or not log_decay.is_floating_point() \
                    or tuple(log_decay.shape) != size:
                shown = f"{log_decay.dtype} tensor of shape {tuple(log_decay.shape)}" \
                    if isinstance(log_decay, torch.Tensor) else type(log_decay).__name__
                raise ValueError(f"log_decay must be a floating-point tensor of shape {list(size)} "
                                 f"[batch, query heads, seq_len], got a {shown}")
            if log_decay.device != torch.device(device):
                raise ValueError(f"log_decay is on {log_decay.device} but q is on {device}")
            return log_decay.to(dtype).contiguous()
        if log_decay is not None:
            raise ValueError("log_decay is only taken by specs with decay='gated'")
        if isinstance(self.decay, torch.Tensor):
            if self.decay.device != torch.device(device):
                raise ValueError(f"the spec's decay tensor is on {self.decay.device} but q is on {device}")
            if self.decay.dim() == 1 and self.decay.shape[0] != heads:
                raise ValueError(f"the spec's decay has {self.decay.shape[0]} entries; expected one per query "
                                 f"head ({heads})")
            return torch.log(self.decay.to(dtype)).reshape(1, -1, 1).expand(size).contiguous()
        return torch.full(size, self.fixed_log_decay, dtype=dtype, device=device)

    def describe(self) -> list[str]:
        """Human-readable lines: the feature map's source and the settings."""
        phi = [f"feature_map = {self.feature_map!r}"] if isinstance(self.feature_map, str) \
            else _source("feature_map", self.feature_map)
        scale = "1/sqrt(Dqk)" if self.scale is None else repr(self.scale)
        return [*phi, f"decay = {_show(self.decay)}", f"normalize = {self.normalize!r}", f"scale = {scale}",
                f"eps = {self.eps!r}"] + ([] if self.causal else ["causal = False"])


