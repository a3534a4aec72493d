"""Calls traced by torch.compile build their kernels outside the trace.

The first call of a spec (or of a new kind of call: a KV cache, packed
sequences, dropout...) traces the mods, renders and imports a kernel module:
Python that Dynamo cannot trace. A call made while Dynamo traces therefore
first passes through the ``attngen::ready`` op. Dynamo runs that op's fake
implementation as plain Python, outside the trace, and it builds and imports
everything the call needs; the traced code after it only finds them in caches.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch.utils._python_dispatch import _disable_current_modes

_serials = itertools.count()
_owners: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register(owner) -> str:
    """Register ``owner`` (a compiled spec with a ``build_for_call(call, device)`` method that builds
    and imports what a call of kind ``call`` (a string) on ``device`` needs); returns the name its
    traced calls pass to :func:`ready` (a string: Dynamo may make an int attribute a symbol)."""
    name = str(next(_serials))
    _owners[name] = owner
    return name


@torch.library.custom_op("attngen::ready", mutates_args=())
def _ready(q: torch.Tensor, call: str) -> torch.Tensor:
    _build(q, call)
    return q.new_empty(0)


@_ready.register_fake
def _(q, call):
    with _disable_current_modes():  # real tensors for the stand-ins and constants it creates, not fake ones
        _build(q, call)
    return q.new_empty(0)


def _build(q: torch.Tensor, call: str) -> None:
    name, kind = call.split(":", 1)
    _owners[name].build_for_call(kind, q.device)


def ready(q: torch.Tensor, name: str, call: str) -> None:
    """Inside a torch.compile trace: build what the call of kind ``call`` of the spec registered as
    ``name`` needs on ``q``'s device; outside one, nothing (the call builds it itself)."""
    if torch.compiler.is_compiling():
        torch.ops.attngen.ready(q, name + ":" + call)
