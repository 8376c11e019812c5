"""Writing files so that a crash never leaves one that looks complete.

`atomic_write` writes to a temporary file beside the target, flushes and fsyncs it, and renames it
into place; until the rename the old file (or none) is what readers see.
"""
from __future__ import annotations

import contextlib
import os
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it is fsynced and renamed to `path`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_replace(tmp: str, path: str) -> None:
    """fsync a finished temporary file (written by another library) and rename it to `path`."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
