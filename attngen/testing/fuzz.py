"""A spec fuzzer: random score_mods and mask_mods from a small grammar.

Expressions are built as Python source over the FlexAttention arguments:
integer index arithmetic (``+ - *``, ``//`` and ``%`` by constants,
``minimum``/``maximum``, ``abs``, loads from captured integer tables, quotients
converted back to ints by ``.long()``, ``floor``, ``ceil``),
comparisons combined with ``& | ~``, float arithmetic on the score with
``tanh``/``sigmoid``/``exp``/``where``/``clamp``/``sqrt``/``asinh``/``atan``, activations
(``elu``, ``leaky_relu``, ``softsign``, ``logaddexp``, ``clamp_min``, ``softshrink``, ``tanhshrink``,
``add`` with ``alpha``) and loads from
captured (optionally learnable) float tables. Magnitudes stay bounded so that
float32 kernels and the float64 reference can be compared under one rule,
branches only ever test integers (a float test could flip on a rounding error),
and every score depends on ``s``: one that does not can cancel to within
float32's rounding of 0, where the sign that ReLU's weights and the support
count test flips. One score_mod in five drops some keys with ``-inf`` (as FlexAttention's do).
:func:`fuzz_specs` plugs the grammar into :func:`~attngen.testing.strategies.specs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hypothesis
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from ..stats import map_stats
from .cases import Case, for_spec
from .compare import Comparison
from .reference_check import AmbiguousTopK, compare_with_reference
from .snippets import Snippet, program
from .strategies import seeded, shapes, specs

TABLE = 97  # length of every captured table; indices are taken % TABLE


class _Grammar:
    """Draws expression source; collects the captured tables it uses as source lines."""

    def __init__(self, draw, prefix: str, heads: int):
        self.draw, self.prefix, self.heads = draw, prefix, heads
        self.captures: list[str] = []

    def table(self, kind: str) -> str:
        name = f"{self.prefix}_{kind}{len(self.captures)}"
        seed = self.draw(st.integers(0, 9999))
        gen = f"generator=torch.Generator().manual_seed({seed})"
        if kind == "ids":
            source = f"torch.randint(-4, 6, ({TABLE},), {gen})"
        elif kind == "flags":
            source = f"torch.rand({TABLE}, {gen}) > 0.4"
        else:
            learn = ".requires_grad_()" if self.draw(st.booleans()) else ""
            source = f"(0.5 * torch.randn({TABLE}, {gen})){learn}"
        self.captures.append(f"{name} = {source}")
        return name

    def choice(self, options):
        return self.draw(st.sampled_from(options))

    def integer(self, depth: int) -> str:
        """An integer expression that always involves an index (constants only as operands)."""
        if depth == 0 or self.draw(st.integers(0, 3)) == 0:
            return self.choice(["q_idx", "kv_idx", "b", "h", "(q_idx - kv_idx)"])
        a = self.integer(depth - 1)
        kind = self.choice(["add", "sub", "const", "mul", "floordiv", "mod", "min", "max", "abs", "load", "convert"])
        if kind in ("add", "sub"):
            return f"({a} {'+' if kind == 'add' else '-'} {self.integer(depth - 1)})"
        if kind == "const":
            return f"({a} + {self.draw(st.integers(-9, 9))})"
        if kind == "mul":
            return f"({a} * {self.draw(st.integers(-3, 3))})"
        if kind in ("floordiv", "mod"):
            return f"({a} {'//' if kind == 'floordiv' else '%'} {self.draw(st.integers(1, 7))})"
        if kind in ("min", "max"):
            return f"torch.{kind}imum({a}, {self.integer(depth - 1)})"
        if kind == "abs":
            return f"abs({a})"
        if kind == "convert":  # a quotient of ints is exact where it is whole: float32 and float64 agree
            quotient = f"({a}).float() / {self.draw(st.integers(2, 5))}.0"
            return self.choice([f"({quotient}).to(torch.long)", f"torch.floor({quotient}).long()",
                                f"torch.ceil({quotient}).int()"])
        return f"{self.table('ids')}[{a} % {TABLE}]"

    def condition(self, depth: int) -> str:
        if depth == 0 or self.draw(st.integers(0, 2)) == 0:
            if self.draw(st.integers(0, 4)) == 0:
                return f"{self.table('flags')}[{self.integer(1)} % {TABLE}]"
            op = self.choice(["<", "<=", ">", ">=", "==", "!="])
            return f"({self.integer(depth)} {op} {self.integer(depth)})"
        kind = self.choice(["and", "or", "not", "where"])
        a = self.condition(depth - 1)
        if kind == "not":
            return f"~{a}"
        if kind == "where":
            return f"torch.where({self.condition(depth - 1)}, {a}, {self.condition(depth - 1)})"
        return f"({a} {'&' if kind == 'and' else '|'} {self.condition(depth - 1)})"

    def bounded(self, depth: int, of_s: bool = False) -> str:
        """A float tensor expression of magnitude at most about 3 (never a bare Python number, which
        torch functions refuse); ``of_s``: one that depends on the score."""
        if depth == 0 or self.draw(st.integers(0, 3)) == 0:
            scale = self.draw(st.sampled_from([0.25, -0.5, 1.5]))
            free = [] if of_s else [f"torch.tanh(0.1 * {self.integer(1)})",
                                    f"{self.table('values')}[{self.integer(1)} % {TABLE}]"]
            return self.choice(free + [f"{scale} * torch.tanh(s)", "torch.tanh(s)"])
        a = self.score(depth - 1)
        return self.choice([f"torch.tanh({a})", f"torch.sigmoid({a})", f"torch.exp(-abs({a}))",
                            f"{a} / (1.0 + {a} * {a})", f"torch.clamp({a}, min=-2.0, max=3.0)",
                            f"torch.nn.functional.softsign({a})", f"torch.asinh(0.5 * {a}) / 2.0",
                            f"torch.atan({a})"])

    def score(self, depth: int) -> str:
        """A float expression of the score, growing at most linearly in it."""
        if depth == 0:
            return self.choice(["s", "s", f"(s * {self.bounded(0)})"])
        kind = self.choice(["add", "sub", "scale", "where", "abs", "sqrt", "bounded", "square", "activation"])
        a = self.score(depth - 1)
        if kind in ("add", "sub"):
            other = self.bounded(depth - 1) if self.draw(st.booleans()) else self.score(depth - 1)
            return f"({a} {'+' if kind == 'add' else '-'} {other})"
        if kind == "scale":
            return f"({a} * {self.bounded(depth - 1)})"
        if kind == "where":
            return f"torch.where({self.condition(depth - 1)}, {a}, {self.score(depth - 1)})"
        if kind == "abs":
            return f"abs({a})"
        if kind == "sqrt":
            return f"torch.sqrt({a} * {a} + 1.0)"
        if kind == "square":
            return f"(0.2 * {self.bounded(depth - 1, of_s=True)} ** 2)"
        if kind == "activation":
            return self.choice([f"torch.nn.functional.elu({a})", f"torch.nn.functional.leaky_relu({a}, 0.2)",
                                f"torch.logaddexp({a}, {self.bounded(depth - 1)})", f"({a}).clamp_min(-1.0)",
                                f"torch.nn.functional.softshrink({a}, 0.5)", f"torch.nn.functional.tanhshrink({a})",
                                f"torch.add({a}, {self.bounded(depth - 1)}, alpha=0.5)"])
        return self.bounded(depth, of_s=True)


@st.composite
def fuzz_score_mods(draw, heads: int = 4, batch: int = 2, max_len: int = 80) -> Snippet:
    """A random score_mod (variable ``score_mod``) from the grammar."""
    grammar = _Grammar(draw, "score", heads)
    body = grammar.score(draw(st.integers(0, 3)))
    if draw(st.integers(0, 4)) == 0:  # some keys dropped with -inf, as FlexAttention's score_mods do
        body = f"torch.where({grammar.condition(1)}, {body}, float('-inf'))"
    return Snippet("score_mod", grammar.captures + [f"score_mod = lambda s, b, h, q_idx, kv_idx: {body}"])


@st.composite
def fuzz_masks(draw, heads: int = 4, batch: int = 2, max_len: int = 80) -> Snippet:
    """A random mask_mod (variable ``mask_mod``) from the grammar."""
    grammar = _Grammar(draw, "mask", heads)
    body = grammar.condition(draw(st.integers(0, 3)))
    return Snippet("mask_mod", grammar.captures + [f"mask_mod = lambda b, h, q_idx, kv_idx: {body}"])


@st.composite
def fuzz_calls(draw, case: Case, spec) -> Snippet:
    """How a fuzzed spec is called (variable ``CALL``: ``CALL(q, k, v)`` gives the call's positional and
    keyword arguments): on the whole inputs, on a KV cache of random lengths and query offsets (split-KV
    or not, paged or not), with a random block mask (also on a contiguous cache), or on packed sequences
    of random lengths; each with or without dropout."""
    maps = map_stats(spec.stats)
    kinds = ["dense", "blocks", "cache", "paged"] \
        + ([] if any(m.block_q is not None for m in maps) else ["packed"])  # no pooled maps of packed sequences
    kind = draw(st.sampled_from(kinds))
    extra = [draw(st.sampled_from(["", "", f"dropout_p={draw(st.sampled_from([0.1, 0.5]))}"]))]
    batch = dict(min_size=case.batch, max_size=case.batch)
    if kind == "packed":
        lens_q = draw(st.lists(st.integers(0, case.q_len), **batch))
        lens_k = draw(st.lists(st.integers(0, case.kv_len), **batch))
        return _call(f"attngen.testing.packed_call(q, k, v, {_join([str(lens_q), str(lens_k), *extra])})")
    if kind in ("cache", "paged"):
        lens = draw(st.lists(st.integers(0, case.kv_len), **batch))
        extra.append(f"mode={draw(st.sampled_from(['prefill', 'decode']))!r}")
        if draw(st.booleans()):  # queries anywhere in the cache rather than its last tokens
            offsets = draw(st.lists(st.integers(0, max(0, case.kv_len - case.q_len)), **batch))
            extra.append(f"q_offset=torch.tensor({offsets})")
        if kind == "paged":
            return _call(f"attngen.testing.paged_call(q, k, v, {lens}, page_size={draw(st.sampled_from([4, 16]))}, "
                         f"seed={draw(st.integers(0, 9999))}, {_join(extra)})")
        extra.append(f"kv_lens=torch.tensor({lens})")
    if kind == "blocks" or (kind == "cache" and draw(st.booleans())):
        # [B or 1, Hq or 1, nq, nk] blocks of any size: a bool matrix says it by dividing the lengths evenly
        size = (draw(st.integers(1, case.q_len)), draw(st.integers(1, case.kv_len)))
        sizes = (draw(st.sampled_from([1, case.batch])), draw(st.sampled_from([1, case.q_heads])),
                 -(-case.q_len // size[0]), -(-case.kv_len // size[1]))
        blocks = seeded(f"torch.rand({sizes}, ", draw(st.integers(0, 9999))) + \
            f" > {draw(st.sampled_from([0.2, 0.6]))}"
        even = case.q_len % size[0] == 0 and case.kv_len % size[1] == 0
        extra.append(f"block_mask={blocks}" if even and draw(st.booleans())
                     else f"block_mask=attngen.BlockMask({blocks}, block_size={size})")
    return _call(f"((q, k, v), dict({_join(extra)}))")


def _join(arguments: list[str]) -> str:
    return ", ".join(a for a in arguments if a)


def _call(expression: str) -> Snippet:
    return Snippet("CALL", f"CALL = lambda q, k, v: {expression}")


def fuzz_specs(heads: int = 4, batch: int = 2, max_len: int = 80):
    """Whole specs (variable ``SPEC``) whose score_mod and mask_mod come from the grammar."""
    return specs(heads=heads, batch=batch, max_len=max_len, score_mods=fuzz_score_mods, masks=fuzz_masks)


def _reproduction(spec: Snippet, call: Snippet, case: Case) -> str:
    return program(spec, call, body=f"""
        {case.snippet()}
        args, call = CALL(q, k, v)
        attngen.testing.assert_matches_reference(SPEC, *args, seed={case.seed}, **call)
    """)


@dataclass
class NearMiss:
    """A spec whose errors all stayed within ``near_miss`` times their bounds (not shrunk)."""

    failure: list[Comparison]
    reproduction: str


@dataclass
class FuzzReport:
    """What a fuzzing run did: examples run, near misses passed, and the shrunk failure if one was found."""

    examples: int = 0
    failure: list[Comparison] = field(default_factory=list)
    spec: Snippet | None = None
    case: Case | None = None
    call: Snippet | None = None
    error: str | None = None
    near_misses: list[NearMiss] = field(default_factory=list)

    def reproduction(self) -> str:
        return _reproduction(self.spec, self.call, self.case)


def fuzz(examples: int, seed: int = 0, max_len: int = 48, progress=None, near_miss: float = 1.0,
         on_near_miss=None, dtypes=(torch.float32,)) -> FuzzReport:
    """Compile and check ``examples`` random specs (:func:`fuzz_specs`), called as
    :func:`fuzz_calls` draws, against the float64 reference on random shapes (of ``dtypes``); stop at the first
    mismatch, shrunk by hypothesis. With ``near_miss`` > 1, a spec whose errors are all at most
    ``near_miss`` times their bounds is recorded (and passed to ``on_near_miss``) and the run goes
    on: in long float32 runs, ill-conditioned specs and long sums exceed the 2x rule by rounding
    alone, and a bug's errors are larger than its bound by far more."""
    report = FuzzReport()

    @hypothesis.seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        case = data.draw(shapes(max_len=max_len, heads=4, batch=2, dtypes=dtypes), label="case")
        spec = data.draw(fuzz_specs(heads=4, batch=2, max_len=max_len), label="spec")
        case = for_spec(case, spec.value)
        call = data.draw(fuzz_calls(case, spec.value), label="call")
        try:
            args, kwargs = call.value(*case.tensors())
            results = compare_with_reference(spec.value, *args, seed=case.seed, **kwargs)
        except AmbiguousTopK:  # float32 may keep other keys than the reference: these inputs test nothing
            reject()
        except Exception as error:  # a crash is a finding too
            report.spec, report.case, report.call = spec, case, call
            report.error = f"{type(error).__name__}: {error}"
            raise
        report.examples += 1
        if progress and report.examples % 100 == 0:
            progress(report)
        bad = [r for r in results if not r.ok]
        if bad and all(r.error <= near_miss * r.bound for r in bad):
            miss = NearMiss(bad, _reproduction(spec, call, case))
            if all(m.reproduction != miss.reproduction for m in report.near_misses):
                report.near_misses.append(miss)
                if on_near_miss:
                    on_near_miss(report, miss)
        elif bad:
            report.failure, report.spec, report.case, report.call = bad, spec, case, call
            raise AssertionError("mismatch")

    try:
        run()
    except Exception:  # noqa: BLE001 - the report holds the shrunk failure or crash
        if report.spec is None:
            raise
    return report
