"""The on-disk cache of generated kernel modules."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    """``$ATTNGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/attngen``, else ``~/.cache/attngen``."""
    if os.environ.get("ATTNGEN_CACHE_DIR"):
        return Path(os.environ["ATTNGEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attngen"


def cached_source(key: str, build: Callable[[], str]) -> tuple[Path, bool]:
    """The path of the module cached under ``key``, building it on a miss.

    Returns ``(path, hit)``. Writes go to a temporary file that is renamed
    into place, so concurrent processes never see a partial module.
    """
    directory = cache_dir()
    path = directory / f"{key}.py"
    if path.exists():
        return path, True
    source = build()
    try:
        write_atomic(path, source)
    except OSError as error:  # a file where the folder should be, no permission, a full disk
        raise OSError(error.errno, f"attngen cannot write its kernel cache in {directory} ({error.strerror}: "
                                   f"{error.filename}); set ATTNGEN_CACHE_DIR to a folder it can write") from error
    return path, False


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def entries() -> list[Path]:
    """The cached kernel modules, oldest first."""
    directory = cache_dir()
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*.py"), key=lambda p: p.stat().st_mtime)


def clear() -> int:
    """Delete every cached module, tuning result, lock and leftover temporary file; return how many modules."""
    removed = entries()
    for path in removed + [p for pattern in ("*.json", "*.lock", ".*.tmp") for p in cache_dir().glob(pattern)]:
        path.unlink(missing_ok=True)
    return len(removed)
