"""Generated test values that carry the Python that builds them.

Every strategy in :mod:`attngen.testing.strategies` draws a :class:`Snippet`:
source lines that define one variable, executed on demand. Its ``repr`` is the
source, so a failing example that hypothesis prints (or ``attngen check``
reports) can be pasted into a file and run as it is. Captured tensors are drawn
from seeded generators inside the source, so they are the same everywhere.
"""

from __future__ import annotations

import textwrap

PRELUDE = ("import torch", "import attngen as ag", "import attngen.testing")


class Snippet:
    """Source ``lines`` that define the variable ``name``; ``value`` runs them (once)."""

    def __init__(self, name: str, lines: list[str] | str, uses: tuple[Snippet, ...] = ()):
        self.name = name
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        self.uses = uses  # snippets whose variables these lines refer to
        self._value = None
        self._ran = False

    def source(self) -> str:
        """Every line needed to define ``name``, dependencies first (each once)."""
        seen, lines = set(), []

        def add(snippet: Snippet) -> None:
            for used in snippet.uses:
                add(used)
            if id(snippet) not in seen:
                seen.add(id(snippet))
                lines.extend(snippet.lines)
        add(self)
        return "\n".join(lines)

    @property
    def value(self):
        if not self._ran:
            namespace: dict = {}
            exec(compile("\n".join(PRELUDE) + "\n" + self.source(), f"<snippet {self.name}>", "exec"), namespace)
            self._value, self._ran = namespace[self.name], True
        return self._value

    def __repr__(self) -> str:
        return self.source()


def program(*snippets: Snippet, body: str = "") -> str:
    """A runnable file: the imports, every snippet's source (shared ones once), then ``body``."""
    everything = Snippet("", [], uses=snippets).source()
    return "\n".join([*PRELUDE, "", everything, textwrap.dedent(body).strip()]) + "\n"
