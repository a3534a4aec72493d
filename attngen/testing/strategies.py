"""Hypothesis strategies for attention inputs and variants.

``shapes()`` draws :class:`~attngen.testing.Case` inputs; ``masks()``,
``score_mods()``, ``normalizations()`` and ``specs()`` draw
:class:`~attngen.testing.snippets.Snippet` objects whose source builds a
mask_mod, a score_mod, a normalization or a whole ``AttentionSpec`` (variable
``SPEC``) with any captured tensors drawn from seeded generators, so a failing
example is printed as Python that reproduces it. Captured tensors are sized by
``heads`` (query heads), ``batch`` and ``max_len`` (the longest Lq or Lk).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from ..spec import takes_top_k
from ..stats import ENTROPY_FAMILIES
from .cases import Case
from .snippets import Snippet

SPECIAL_LENGTHS = (1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)


def seeded(expression: str, seed: int) -> str:
    """``expression`` with ``generator=...`` bound to a seeded generator (expression ends with ``(..., ``)."""
    return f"{expression}generator=torch.Generator().manual_seed({seed}))"


@st.composite
def shapes(draw, max_len: int = 80, batch=(1, 2), heads: int | None = None, dims=(8, 16, 24, 32, 40, 64),
           dtypes=(torch.float32,)) -> Case:
    """Attention inputs: GQA ratios 1, 2, 4 (or the divisors of a fixed ``heads``), Lq != Lk, lengths
    of 1 and around the block sizes, Dqk != Dv, the given dtypes."""
    lengths = st.one_of(st.sampled_from([n for n in SPECIAL_LENGTHS if n <= max_len]), st.integers(1, max_len))
    if heads is None:
        kv_heads = draw(st.integers(1, 2))
        q_heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    else:
        q_heads = heads
        kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    return Case(draw(st.sampled_from(batch) if isinstance(batch, tuple) else st.just(batch)), q_heads, kv_heads,
                draw(lengths), draw(lengths), draw(st.sampled_from(dims)), draw(st.sampled_from(dims)),
                draw(st.sampled_from(dtypes)), draw(st.integers(0, 2**16)))


@st.composite
def masks(draw, batch: int = 2, heads: int = 4, max_len: int = 80) -> Snippet:
    """A mask_mod (variable ``mask_mod``): the mask library with random parameters, data-dependent
    masks, lambdas, and ``& | ~`` compositions of them."""
    seed = st.integers(0, 9999)
    length = st.integers(1, max_len)
    captures: list[str] = []

    def table() -> str:
        name = f"mask_table{len(captures)}"
        captures.append(f"{name} = " + seeded(f"torch.rand({batch}, {max_len}, {max_len}, ", draw(seed))
                        + f" > {draw(st.sampled_from([0.2, 0.5, 0.9]))}")
        return f"(lambda b, h, q_idx, kv_idx: {name}[b, q_idx, kv_idx])"

    def per_batch(high: int) -> str:
        return seeded(f"torch.randint(0, {high}, ({batch},), ", draw(seed))

    def documents() -> str:
        ids = seeded(f"torch.randint(0, {draw(st.integers(1, 6))}, ({batch}, {max_len}), ", draw(seed))
        return f"ag.masks.document({ids}{'.sort().values' if draw(st.booleans()) else ''})"

    def neighborhood() -> str:
        width = draw(st.integers(2, 12))
        return (f"ag.masks.neighborhood_2d({-(-max_len // width)}, {width}, {draw(st.sampled_from([1, 3, 5]))}, "
                f"{draw(st.integers(1, 2))})")

    builders = {
        "causal": lambda: "ag.masks.causal",
        "window": lambda: f"ag.masks.sliding_window({draw(st.integers(0, max_len))}, {draw(st.integers(0, 20))})",
        "chunked": lambda: f"ag.masks.chunked({draw(length)})",
        "prefix": lambda: f"ag.masks.prefix_lm({draw(st.integers(0, max_len))})",
        "prefix_tensor": lambda: f"ag.masks.prefix_lm({per_batch(max_len + 1)})",
        "block_causal": lambda: f"ag.masks.block_causal({draw(length)})",
        "dilated": lambda: f"ag.masks.dilated_sliding_window({draw(st.integers(1, 8))}, {draw(st.integers(1, 5))})",
        "strided": lambda: f"ag.masks.strided({draw(st.integers(1, 9))})",
        "global": lambda: (f"(ag.masks.global_tokens({draw(st.integers(1, 8))}) | "
                           f"ag.masks.sliding_window({draw(length)}))"),
        "document": documents,
        "padding": lambda: f"ag.masks.padding({per_batch(max_len + 1)})",
        "neighborhood": neighborhood,
        "empty_rows": lambda: f"(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx - {draw(st.integers(1, 9))})",
        "head_window": lambda: "(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx <= 3 * h + 1) & (kv_idx <= q_idx))",
        "table": table,
    }

    def one() -> str:
        return builders[draw(st.sampled_from(sorted(builders)))]()

    def as_mask(expression: str) -> str:  # lambdas become Masks, which combine with & | ~
        return f"ag.masks.Mask({expression}, 'custom')" if expression.startswith("(lambda") else expression

    expression = one()
    combine = draw(st.sampled_from(["", "&", "|", "~&"]))
    if combine:
        first, second = as_mask(expression), as_mask(one())
        expression = f"~{first} & {second}" if combine == "~&" else f"{first} {combine} {second}"
    return Snippet("mask_mod", captures + [f"mask_mod = {expression}"])


@st.composite
def score_mods(draw, heads: int = 4, batch: int = 2, max_len: int = 80) -> Snippet:
    """A score_mod (variable ``score_mod``, possibly ``None``), some with learnable captured tensors
    indexed per head, per query, per key, or per relative position."""
    seed = draw(st.integers(0, 9999))
    kind = draw(st.sampled_from(["none", "alibi", "softcap", "relative_bias", "temperature", "key_bias",
                                 "checkerboard", "polynomial"]))
    learn = ".requires_grad_()" if draw(st.booleans()) else ""
    if kind == "none":
        return Snippet("score_mod", "score_mod = None")
    if kind == "alibi":
        return Snippet("score_mod", [
            "score_slopes = " + seeded(f"torch.rand({heads}, ", seed) + learn,
            "score_mod = lambda s, b, h, q_idx, kv_idx: s - score_slopes[h] * (q_idx - kv_idx) * 0.1"])
    if kind == "softcap":
        cap = draw(st.sampled_from([0.5, 2.0, 20.0]))
        return Snippet("score_mod", f"score_mod = lambda s, b, h, q_idx, kv_idx: {cap} * torch.tanh(s / {cap})")
    if kind == "relative_bias":
        return Snippet("score_mod", [
            "score_bias = (0.5 * " + seeded(f"torch.randn({heads}, {2 * max_len - 1}, ", seed) + f"){learn}",
            f"score_mod = lambda s, b, h, q_idx, kv_idx: s + score_bias[h, q_idx - kv_idx + {max_len - 1}]"])
    if kind == "temperature":
        return Snippet("score_mod", [
            "score_temperature = (0.5 + " + seeded(f"torch.rand({max_len}, ", seed) + f"){learn}",
            "score_mod = lambda s, b, h, q_idx, kv_idx: s * score_temperature[q_idx]"])
    if kind == "key_bias":
        return Snippet("score_mod", [
            "score_key_bias = " + seeded(f"torch.randn({batch}, {max_len}, ", seed) + learn,
            "score_mod = lambda s, b, h, q_idx, kv_idx: s + score_key_bias[b, kv_idx]"])
    if kind == "checkerboard":
        return Snippet("score_mod", "score_mod = lambda s, b, h, q_idx, kv_idx: "
                                    "torch.where((q_idx // 3 + kv_idx // 5) % 2 == 0, s * 1.5, s - 1.0)")
    return Snippet("score_mod", "score_mod = lambda s, b, h, q_idx, kv_idx: 0.05 * s ** 3 - (s * s + 1.0) ** 0.5 "
                                "+ torch.clamp(s, min=-1.0, max=1.0) * torch.sigmoid(s)")


@st.composite
def normalizations(draw, heads: int = 4) -> Snippet:
    """A normalization (variable ``normalization``) from ``ag.norms``, parameters fixed or learnable."""
    seed = draw(st.integers(0, 9999))

    def per_head(scale: str, offset: str) -> str:
        return f"({offset} + {scale} * " + seeded(f"torch.rand({heads}, ", seed) + ").requires_grad_()"
    count = draw(st.sampled_from(["length", "unmasked"]))
    choices = {
        "softmax": "ag.norms.Softmax()",
        "off_by_one": "ag.norms.OffByOne()",
        "learnable_sink": f"ag.norms.Softmax(sink={per_head('1.0', '-0.5')})",
        "scalable": f"ag.norms.ScalableSoftmax(s={draw(st.sampled_from([0.3, 0.7]))}, count={count!r})",
        "scalable_learnable": f"ag.norms.ScalableSoftmax(s={per_head('0.5', '0.5')})",
        "affine": f"ag.norms.AffineSoftmax(alpha={per_head('0.5', '0.5')}, beta=0.05)",
        "sigmoid": f"ag.norms.Sigmoid(bias={draw(st.sampled_from(['-1.0', repr('-log n')]))}, count={count!r})",
        "sigmoid_learnable": f"ag.norms.Sigmoid(bias={per_head('1.0', '-1.5')})",
        "relu": f"ag.norms.ReLU(power={draw(st.integers(1, 3))}, normalize={count!r})",
        "elementwise": "ag.norms.Elementwise(lambda s: torch.sigmoid(s) ** 2)",
        "sparsemax": "ag.norms.Sparsemax()",
        "entmax": f"ag.norms.Entmax({draw(st.sampled_from([1.5, 1.25, 1.7]))})",
        "entmax_learnable": f"ag.norms.Entmax({per_head('0.85', '1.15')})",
        "stick_breaking": "ag.norms.StickBreaking()",
        # eps 1e-2, not the paper's 1e-8: the gradients of a row whose normalizer is far below 1e-2 (one
        # key scoring near 0) exceed the float32 rule (3.9x at worst over 40 seeds of 1-key rows; 0.46x
        # with eps = 1e-2), a limit the README states
        "softpick": "ag.norms.Softpick(eps=1e-2)",
        "signed_softmax": "ag.norms.SignedSoftmax()",
        "normalized": "ag.norms.Normalized(lambda s: torch.clamp(s, min=0.0) ** 2 + 0.1)",
    }
    return Snippet("normalization", f"normalization = {choices[draw(st.sampled_from(sorted(choices)))]}")


DRIFT = "ag.stats.expectation(lambda s, b, h, q_idx, kv_idx: torch.tanh(s) * (q_idx - kv_idx), 'drift')"


@st.composite
def stats_for(draw, normalization: Snippet) -> str:
    """The source of a ``stats=`` tuple valid for ``normalization``."""
    norm = normalization.value
    if norm.family != "softmax":  # the support where weights have exact zeros, the max, maps, the entropy
        chosen = ["'support'"] if norm.exact_zeros and draw(st.booleans()) else []
        chosen += ["'max'"] if draw(st.booleans()) else []
        chosen += ["'entropy'"] if norm.family in ENTROPY_FAMILIES and draw(st.booleans()) else []
        chosen += [DRIFT] if draw(st.booleans()) else []
        if draw(st.booleans()):
            chosen.append(draw(st.sampled_from(["ag.stats.col_sum()", "ag.stats.pooled(5, 7, 'mean', name='map')"])))
        return "(" + "".join(f"{s}, " for s in chosen) + ")"
    chosen = ["'lse'"] if draw(st.booleans()) else []
    chosen += ["'max'"] if draw(st.booleans()) else []
    if norm.affine is None:
        if draw(st.booleans()):
            chosen.append("'entropy'")
        if draw(st.booleans()):
            chosen.append(DRIFT)
        if draw(st.booleans()):
            chosen.append("ag.stats.col_sum()")
        if draw(st.booleans()):
            block = draw(st.sampled_from([1, 5, 16]))
            chosen.append(f"ag.stats.pooled({block}, {draw(st.sampled_from([1, 7, 16]))}, "
                          f"{draw(st.sampled_from(['mean', 'sum']))!r}, name='map')")
    return "(" + "".join(f"{s}, " for s in chosen) + ")"


@st.composite
def specs(draw, heads: int = 4, batch: int = 2, max_len: int = 80, score_mods=score_mods, masks=masks) -> Snippet:
    """A whole ``AttentionSpec`` (variable ``SPEC``): a score_mod, a mask_mod (or none), a
    normalization, a scale and statistics valid for it; one in four softmaxes without sink or affine
    output is differential attention instead (a fixed or learnable per-head ``lam``, no statistics), one
    in four other normalizations of logits without affine output keeps each row's top-k logits."""
    score = draw(score_mods(heads=heads, batch=batch, max_len=max_len))
    mask = draw(masks(batch=batch, heads=heads, max_len=max_len)) if draw(st.booleans()) \
        else Snippet("mask_mod", "mask_mod = None")
    norm = draw(normalizations(heads=heads))
    scale = draw(st.sampled_from(["None", "0.3", "1.0", "-0.3"]))
    plain = norm.value.family == "softmax" and norm.value.sink is None and norm.value.affine is None
    extra = ""
    if plain and draw(st.integers(0, 3)) == 0:
        learnable = "(0.2 + 0.6 * " + seeded(f"torch.rand({heads}, ", draw(st.integers(0, 9999))) + ").requires_grad_()"
        extra = f", differential={draw(st.sampled_from(['0.5', learnable]))}"
    elif takes_top_k(norm.value) and draw(st.integers(0, 3)) == 0:
        extra = f", top_k={draw(st.integers(1, 8))}"  # inputs on the grid: see attngen.testing.cases.for_spec
    stats = "()" if "differential" in extra else draw(stats_for(norm))
    line = (f"SPEC = ag.AttentionSpec(score_mod=score_mod, mask_mod=mask_mod, normalization=normalization, "
            f"scale={scale}, stats={stats}{extra})")
    return Snippet("SPEC", line, uses=(score, mask, norm))
