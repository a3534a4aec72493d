"""Property testing of attention variants against the float64 reference.

* :func:`assert_matches_reference` / :func:`compare_with_reference`: a
  compiled spec against its materialized reference (output, statistics,
  gradients of q, k, v and learnable tensors) under FlashAttention's rule;
  :func:`packed_call` / :func:`paged_call` turn a :class:`Case`'s tensors
  into packed sequences or a paged KV cache;
* :mod:`~attngen.testing.strategies`: hypothesis strategies for shapes,
  masks, score_mods, normalizations and whole specs;
* :mod:`~attngen.testing.invariants`: properties that need no reference
  (:mod:`~attngen.testing.linear_properties` for linear attention);
* :mod:`~attngen.testing.fuzz`: random specs from a grammar;
* :func:`check_spec`: everything above for one spec (``attngen check``);
* :mod:`~attngen.testing.gpu_compile`: build the kernels for a GPU without one;
* :func:`~attngen.testing.dispatches.dispatched`: the torch operations a call dispatches.
"""

from .cases import Case, packed_call, paged_call
from .check import assert_property, check_spec
from .compare import Comparison, assert_close, max_error
from .reference_check import AmbiguousTopK, Float64, assert_matches_reference, compare_with_reference, learnable

__all__ = ["AmbiguousTopK", "Case", "Comparison", "Float64", "assert_close", "assert_matches_reference",
           "assert_property", "check_spec", "compare_with_reference", "learnable", "max_error", "packed_call",
           "paged_call"]
