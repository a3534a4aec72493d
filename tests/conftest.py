import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

# Tests never touch the user's cache; subprocess tests inherit this.
os.environ.setdefault("ATTNGEN_CACHE_DIR", tempfile.mkdtemp(prefix="attngen-test-cache-"))

# Tensors allocated without values (torch.empty and the like) come filled with NaN under
# torch.use_deterministic_algorithms(True): an element that no kernel writes then shows against the
# reference. Only without CUDA, where no kernel adds floats atomically (which that mode refuses).
if not torch.cuda.is_available():
    torch.use_deterministic_algorithms(True)

# "ci" (the default) draws the same examples on every run, so a clean clone's run is the one seen here;
# "deep" (HYPOTHESIS_PROFILE=deep) explores: 300 examples a test from a fresh seed.
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from an empty torch.compile cache: the frames attngen shares between specs (the
    call path of every CompiledAttention) would otherwise carry earlier tests' recompilations, and with them
    automatic dynamic shapes and cache limits, into the next test (a nested-tensor compile test raised
    std::bad_alloc inside FakeTensor after 1500 other tests, not alone nor after the other compile tests)."""
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
