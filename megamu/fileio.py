"""Writing files so that a crash never leaves one that looks complete, and fingerprinting them.

`atomic_write` writes to a temporary file beside the target (a name no other writer, process or thread,
can share), flushes and fsyncs it, renames it into place and fsyncs the directory, so the rename itself
survives a power loss; until the rename the old file (or none) is what readers see.

A writer holds a lock on its temporary file while it exists (`lock_temporary`), and the kernel drops it
however the writer ends, so the next run can remove what a killed one left (`remove_stale_temporaries`)
without touching a live writer's file.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import tempfile
import warnings
from typing import IO, Iterator

from megamu.errors import MegamuError, MegamuWarning


def check_output_directory(path: str, option: str) -> None:
    """Refuse, before any work, an output whose directory is missing or not writable (`option` names the flag)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"output directory {directory} does not exist ({option} {path}); create it first")
    if not os.access(directory, os.W_OK):
        raise MegamuError(f"output directory {directory} is not writable ({option} {path}); choose another path "
                          f"or fix its permissions")


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; read once, at import
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; a finished file gets open()'s usual permissions.
NEW_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it is fsynced and renamed to `path`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = new_temporary(directory, f"{name}.", ".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def new_temporary(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """A new temporary file in `directory` (a name no other writer can share), open as the returned fd, with
    the permissions a finished file gets and locked as being written."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
    try:
        os.fchmod(fd, NEW_FILE_MODE)  # mkstemp's 0600 would be kept by the rename
        lock_temporary(fd)
    except BaseException:
        os.close(fd)
        os.remove(tmp)
        raise
    return fd, tmp


def lock_temporary(fd: int) -> None:
    """Mark the temporary file open as `fd` as being written (until it is closed); a filesystem without
    flock gets no mark, and its stale files are then named rather than removed."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale_temporaries(pattern: str) -> list[str]:
    """Remove the temporary files matching `pattern` that no live writer holds (a killed run's), warning
    once with their names; returns the removed paths."""
    removed, unknown = [], []
    for path in sorted(glob.glob(pattern)):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live writer's
            continue
        except OSError:
            unknown.append(path)
            continue
        else:
            os.remove(path)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary file(s) an interrupted run left: {', '.join(removed)}",
                      MegamuWarning)
    if unknown:
        warnings.warn(f"temporary file(s) {', '.join(unknown)} may be an interrupted run's (this filesystem cannot "
                      f"tell); delete them if no other run is writing there", MegamuWarning)
    return removed


def atomic_replace(tmp: str, path: str) -> None:
    """fsync a finished temporary file (written by another library) and rename it to `path`."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def _fsync_directory(directory: str) -> None:
    """Make the renames in `directory` durable; skipped where a directory cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
