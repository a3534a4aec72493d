"""The torch operations a call dispatches: on a GPU each is a kernel launch, or at least a few
microseconds of the host's time, which small and masked calls wait on."""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class _Counted(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def dispatched(run) -> collections.Counter:
    """How many times ``run()`` dispatches each torch operation, by name."""
    with _Counted() as counted:
        run()
    return counted.ops
