"""``attngen check``: property-test one spec and report, with a runnable snippet for any failure.

Each property (the float64 reference comparison, then every invariant of
:mod:`attngen.testing.invariants`, or of :mod:`attngen.testing.linear_properties`
for a linear attention spec) runs on shapes drawn by hypothesis; a failing
example is shrunk to a minimal one before it is reported.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import hypothesis
import torch
from hypothesis import HealthCheck, Phase, given, reject, settings

from .. import reference
from ..linear import LinearAttentionSpec
from ..spec import AttentionSpec
from .cases import Case, for_spec
from .compare import Comparison
from .invariants import PROPERTIES, REFERENCE
from .linear_properties import LINEAR_PROPERTIES, linear_case
from .reference_check import AmbiguousTopK, compare_with_reference
from .snippets import PRELUDE
from .strategies import shapes


def property_functions(spec: AttentionSpec | LinearAttentionSpec) -> dict[str, Callable[..., list[Comparison]]]:
    """Every property ``attngen check`` runs on ``spec``: name -> function(spec, case) -> comparisons."""
    if isinstance(spec, LinearAttentionSpec):
        return LINEAR_PROPERTIES
    return {REFERENCE: lambda spec, case: compare_with_reference(spec, *case.tensors(), seed=case.seed),
            **PROPERTIES}


def assert_property(name: str, spec: AttentionSpec | LinearAttentionSpec, case: Case) -> list[Comparison]:
    """Run one property (see :func:`property_functions`) on ``case``; raise if a comparison fails."""
    results = property_functions(spec)[name](spec, case)
    failures = [str(r) for r in results if not r.ok]
    if failures:
        raise AssertionError(f"{name} fails at {case.id}:\n  " + "\n  ".join(failures))
    return results


@dataclass
class PropertyReport:
    """How one property fared: examples run, examples it did not apply to, the comparison nearest
    its bound (or the shrunk failure) and where."""

    name: str
    examples: int = 0
    not_applicable: int = 0
    worst: Comparison | None = None
    worst_case: Case | None = None
    failure: list[Comparison] = field(default_factory=list)
    failure_case: Case | None = None
    error: str | None = None  # an exception other than a failed comparison
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failure and self.error is None and (self.examples > 0 or self.not_applicable > 0)

    def note(self, case: Case, results: list[Comparison]) -> None:
        if not results:
            self.not_applicable += 1
            return
        self.examples += 1
        for r in results:
            ratio = r.error / r.bound if r.bound > 0 else float("inf") * (r.error > 0)
            if self.worst is None or ratio > self.worst.error / max(self.worst.bound, 1e-300):
                self.worst, self.worst_case = r, case
        if any(not r.ok for r in results):
            self.failure, self.failure_case = [r for r in results if not r.ok], case


def _fits(spec: AttentionSpec | LinearAttentionSpec, case: Case) -> bool:
    """Whether the spec's captured tensors are large enough for this case (indices in range)."""
    if isinstance(spec, LinearAttentionSpec):
        return True
    q, k, _ = Case(case.batch, case.q_heads, case.kv_heads, case.q_len, case.kv_len, 1, 1).tensors(False)
    try:  # the mask, then score_mod at every position: the kernels evaluate it on masked ones too
        reference.scores(q, k, dataclasses.replace(spec, score_mod=None))
        reference.scores(q, k, dataclasses.replace(spec, mask_mod=None))
    except IndexError:
        return False
    return True


def _as_run(spec: AttentionSpec | LinearAttentionSpec, case: Case) -> Case:
    """The case as the spec runs it (causal linear attention: Lk = Lq; top-k: q and k on the grid), so
    reports name what ran."""
    return linear_case(spec, case) if isinstance(spec, LinearAttentionSpec) else for_spec(case, spec)


def _smaller(case: Case):
    """Cases one step simpler than ``case``, simplest first."""
    for name, values in (("dtype", [torch.float32]), ("batch", [1]), ("kv_heads", [case.q_heads]),
                         ("q_len", [1, 2, 3, case.q_len // 2]), ("kv_len", [1, 2, 3, case.kv_len // 2]),
                         ("qk_dim", [8, 16]), ("v_dim", [8, 16]), ("seed", [0])):
        for value in values:
            if value != getattr(case, name) and (name in ("dtype", "seed") or 0 < value < getattr(case, name)):
                yield dataclasses.replace(case, **{name: value})


def _results(function, spec, case: Case) -> list | None:
    """The property ``function``'s comparisons on ``case``; None where the case does not fit the spec's captured
    tensors or puts a top-k cut-off within rounding of another key (see AmbiguousTopK)."""
    if not _fits(spec, case):
        return None
    try:
        return function(spec, case)
    except AmbiguousTopK:
        return None


def _shrink(report: PropertyReport, run, budget: int = 40) -> None:
    """Greedily simplify the report's failing case while the property keeps failing (``budget`` runs).

    Hypothesis's own shrinker would spend minutes here, running the kernels on hundreds of
    candidates; a few steps toward the simplest shapes find the same small cases."""
    improved = True
    while improved and budget > 0:
        improved = False
        for candidate in _smaller(report.failure_case):
            budget -= 1
            results = run(candidate)
            bad = [r for r in results if not r.ok]
            if bad:
                report.failure, report.failure_case = bad, candidate
                improved = True
                break
            if budget <= 0:
                return


def check_spec(spec: AttentionSpec | LinearAttentionSpec, *, examples: int = 20, heads: int = 4, batch: int = 2,
               max_len: int = 96, dtypes=None, seed: int = 0, properties=None, progress=None) -> list[PropertyReport]:
    """Run every property (or those named in ``properties``) on ``examples`` drawn shapes each; a
    failing case is simplified (fewer heads, shorter sequences, float32) while it keeps failing."""
    dtypes = dtypes or (torch.float32,)
    reports = []
    for name, function in property_functions(spec).items():
        if properties and name not in properties:
            continue
        report = PropertyReport(name)
        started = time.perf_counter()

        @hypothesis.seed(seed)
        @settings(max_examples=examples, deadline=None, database=None, print_blob=False,
                  suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate))
        @given(case=shapes(max_len=max_len, batch=tuple(range(1, batch + 1)), heads=heads, dtypes=tuple(dtypes)))
        def run(case):
            case = _as_run(spec, case)
            results = _results(function, spec, case)
            if results is None:
                reject()
            report.note(case, results)
            if report.failure_case == case:
                raise AssertionError(name)

        try:
            run()
        except AssertionError:
            _shrink(report, lambda case: _results(function, spec, _as_run(spec, case)) or [])
            report.failure_case = _as_run(spec, report.failure_case)
        except hypothesis.errors.Unsatisfiable:
            report.error = (f"no drawn shape fits the spec's captured tensors (heads {heads}, batch <= {batch}, "
                            f"lengths <= {max_len}): pass --heads, --batch or --max-len to match them")
        except Exception as error:  # noqa: BLE001 - reported, with the case, rather than a traceback
            report.error = f"{type(error).__name__}: {error}"
        report.seconds = time.perf_counter() - started
        if progress:
            progress(report)
        reports.append(report)
    return reports


def reproduction(report: PropertyReport, spec_source: str, linear: bool = False) -> str:
    """Python that reproduces a failed report: the spec, the shrunk case and the failing call
    (a linear spec's reference call also needs its gates and state: it goes through assert_property)."""
    case = report.failure_case
    direct = report.name == REFERENCE and not linear
    call = (f"attngen.testing.assert_matches_reference(SPEC, q, k, v, seed={case.seed})" if direct
            else f"attngen.testing.assert_property({report.name!r}, SPEC, attngen.testing.{case!r})")
    lines = [*PRELUDE, spec_source.strip()]
    if direct:
        lines.append(case.snippet())
    return "\n".join(lines + [call]) + "\n"


def format_report(reports: list[PropertyReport], spec_source: str, linear: bool = False) -> str:
    """The table ``attngen check`` prints, then a reproduction snippet for each failure."""
    lines = [f"{'property':<22}{'examples':>9}  {'worst error / bound':<36}at"]
    for r in reports:
        if r.error:
            status = f"ERROR {r.error}"
        elif r.examples == 0:
            status = "does not apply to this spec"
        else:
            c = r.failure[0] if r.failure else r.worst
            status = f"{'FAIL ' if r.failure else ''}{c.name} {c.error:.2e} / {c.bound:.2e}"
        where = (r.failure_case or r.worst_case).id if (r.failure_case or r.worst_case) and not r.error else ""
        lines.append(f"{r.name:<22}{r.examples:>9}  {status:<36}{where}")
    failed = [r for r in reports if r.failure]
    for r in failed:
        lines += ["", f"{r.name} fails; the simplest failing case found ({r.failure_case.id}):"]
        lines += [f"  {c}" for c in r.failure]
        lines += ["reproduce with:", *("    " + line for line in reproduction(r, spec_source, linear).splitlines())]
    bad = sum(not r.ok for r in reports)
    lines += ["", "all properties hold" if not bad else f"{bad} of {len(reports)} properties failed"]
    return "\n".join(lines)
