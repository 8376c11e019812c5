"""On-disk cache of sample indices (.npy): built once by rank 0, memory-mapped by every rank.

Files are keyed by a hash of everything that determines their contents, so a change of seed,
sequence length, sample count, split or data gives new files instead of stale ones. Each file
is written with `atomic_write`, so a crash never leaves a complete-looking but truncated index.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Callable, Optional

import numpy as np

from megamu.errors import DataError
from megamu.fileio import atomic_write

# Bump when the layout or meaning of cached arrays changes, so old caches are not reused.
CACHE_FORMAT_VERSION = 1


def cache_key(fields: dict[str, Any]) -> str:
    """A short stable hash of the JSON-serialisable `fields` (order-independent)."""
    payload = json.dumps({"format": CACHE_FORMAT_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_cache_dir(prefix: str) -> str:
    """`index-cache/` beside the data prefix."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


def _distributed_rank() -> Optional[int]:
    """This process's rank if torch.distributed is initialised, else None.

    Checks sys.modules first: if torch was never imported no process group can exist, and the
    data package stays importable without paying for a torch import.
    """
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def load_or_build(cache_dir: str, stem: str, names: tuple[str, ...],
                  build: Callable[[], dict[str, np.ndarray]], description: dict[str, Any]) -> dict[str, np.ndarray]:
    """Arrays `names` from CACHE_DIR/STEM_<name>.npy, built by `build()` first if any is missing.

    Under torch.distributed only rank 0 builds; the others wait at a barrier and then load.
    Every rank gets read-only memory maps. `description` is written beside the arrays as JSON
    so a human can tell what a cache file holds.
    """
    paths = {name: os.path.join(cache_dir, f"{stem}_{name}.npy") for name in names}
    rank = _distributed_rank()
    if rank in (None, 0) and not all(os.path.isfile(p) for p in paths.values()):
        build_error: Optional[BaseException] = None
        try:
            os.makedirs(cache_dir, exist_ok=True)
            arrays = build()
            for name, path in paths.items():
                with atomic_write(path, "wb") as f:
                    np.save(f, arrays[name])
            with atomic_write(os.path.join(cache_dir, f"{stem}_description.json")) as f:
                f.write(json.dumps(description, indent=2, sort_keys=True))
        except Exception as e:  # still reach the barrier so the other ranks do not hang
            build_error = e
        if rank is not None:
            _barrier()
        if build_error is not None:
            raise build_error
    elif rank is not None:
        _barrier()
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise DataError(f"sample index cache file {missing[0]} is missing after rank 0 built it: rank 0 failed "
                        f"(see its error), or data.cache_dir is not on a filesystem shared by all ranks; set "
                        f"data.cache_dir to a shared directory")
    # Plain ndarray views of the maps: np.memmap's Python-level indexing costs more than the read.
    return {name: np.load(path, mmap_mode="r").view(np.ndarray) for name, path in paths.items()}
