"""attngen: a compiler for attention variants.

Describe a variant with FlexAttention-style ``score_mod``/``mask_mod``
functions in an :class:`AttentionSpec`; :func:`compile` turns it into fused
Triton kernels with an automatically derived backward pass.
"""

__version__ = "0.1.0"

from . import masks, norms, reference, stats  # noqa: E402
from .blocks import BlockMask  # noqa: E402
from .errors import SpecError  # noqa: E402
from .linear import LinearAttentionSpec, LinearState  # noqa: E402
from .runtime.compiled import CompiledAttention, attention, compile  # noqa: E402
from .runtime.linear import CompiledLinearAttention  # noqa: E402
from .spec import AttentionSpec  # noqa: E402
from .stats import Stats  # noqa: E402

__all__ = ["AttentionSpec", "BlockMask", "CompiledAttention", "CompiledLinearAttention", "LinearAttentionSpec",
           "LinearState", "SpecError", "Stats", "attention", "compile", "masks", "norms", "reference", "__version__"]
