"""Atomic file writes: the content goes to a temporary file in the destination's folder, which is then
renamed onto the destination, so a reader (or a run interrupted mid-write) never sees half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, suffix: str = ".tmp") -> None:
    """``write(tmp)`` fills a temporary file (``tmp`` is its path, ending in ``suffix``: a writer that picks
    the format from the extension, such as matplotlib's savefig, needs the real one), which is flushed to
    disk and renamed onto ``path``. The file gets an ordinary file's mode (0666 less the umask). If
    ``write`` raises, ``path`` is untouched and the temporary file removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (a checkpoint is never half written)."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))
