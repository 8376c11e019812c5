"""Megatron-Core MMIDIDX v1 token files: a streaming writer and a validating memmap reader.

A dataset is two files sharing a prefix. `PREFIX.bin` is every sequence's tokens concatenated.
`PREFIX.idx` (little-endian) is:

    magic  b"MMIDIDX\\x00\\x00"
    <Q     version = 1
    <B     dtype code (DTYPE_CODES)
    <Q     sequence count S
    <Q     document-index length D (= documents + 1, because the index starts with 0)
    int32  sequence lengths   [S]
    int64  sequence pointers  [S]  (byte offset of each sequence in .bin)
    int64  document indices   [D]  (0, then the sequence count after each document)

The header's document field counts the entries of the document index, leading 0 included: that
is what Megatron-LM, Megatron-Core and GPT-NeoX write and read, so their files load here
unchanged and ours load there.
"""
from __future__ import annotations

import mmap
import os
import shutil
import struct
from array import array
from types import TracebackType
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from megamu.errors import DataError
from megamu.fileio import atomic_replace, lock_temporary, new_temporary, remove_stale_temporaries

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
REBUILD = "re-run megamu-preprocess to rebuild the .bin/.idx pair"  # the fix for a damaged pair
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, doc-index length

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE: dict[np.dtype, int] = {dtype: code for code, dtype in DTYPE_CODES.items()}

# Megatron's threshold: below it token ids fit uint16 with room for a few added special tokens.
_UINT16_VOCAB_LIMIT = 65500
_MAX_SEQUENCE_LENGTH = np.iinfo(np.int32).max

DTypeLike = Union[np.dtype, type, str]


def best_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron uses for a vocabulary: uint16 below 65500 entries, else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < _UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def data_file_path(prefix: str) -> str:
    return f"{prefix}.bin"


def index_file_path(prefix: str) -> str:
    return f"{prefix}.idx"


def _dtype_code(dtype: DTypeLike) -> int:
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF_DTYPE:
        supported = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {dtype} has no MMIDIDX code; use one of: {supported}")
    return _CODE_OF_DTYPE[dtype]


def _as_tokens(tokens: Union[Sequence[int], np.ndarray], dtype: np.dtype) -> np.ndarray:
    """Tokens as a 1-D array of `dtype`, refusing values the dtype cannot hold (never wrap silently)."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"a sequence must be 1-D, got shape {arr.shape}")
    if arr.dtype == dtype:
        return arr
    if arr.size == 0:
        return arr.astype(dtype)
    if dtype.kind in "ui":
        if arr.dtype.kind not in "ui":
            raise ValueError(f"token ids must be integers to store as {dtype}, got {arr.dtype}")
        info = np.iinfo(dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise ValueError(f"token ids span [{lo}, {hi}], outside {dtype}'s range [{info.min}, {info.max}]; "
                             f"write with a wider dtype (best_dtype(vocab_size))")
    return arr.astype(dtype)


class IndexedDatasetWriter:
    """Streams sequences into PREFIX.bin/.idx; nothing appears under the final names before `finalize`.

    Tokens go to a temporary file beside the target as they arrive (memory holds only the
    per-sequence lengths). `finalize` writes the index and renames both files into place, so an
    interrupted run never leaves a complete-looking pair. As a context manager it finalizes on
    success and deletes its temporary files on an exception.
    """

    def __init__(self, prefix: str, dtype: DTypeLike) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._code = _dtype_code(self.dtype)
        directory = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"output directory {directory} does not exist (output prefix {prefix}); "
                                    f"create it first")
        base = os.path.basename(prefix)
        remove_stale_temporaries(os.path.join(directory, f".{base}.*.tmp"))
        bin_fd, self._tmp_bin = new_temporary(directory, f".{base}.", ".bin.tmp")
        self._bin = os.fdopen(bin_fd, "wb")
        self._tmp_idx: Optional[str] = None
        self._sizes = array("i")  # int32, as the index stores them
        self._doc_idx = array("q", [0])
        self._closed = False

    # ---- writing --------------------------------------------------------------------------
    def add_item(self, tokens: Union[Sequence[int], np.ndarray]) -> None:
        """Append one sequence to the current document (close it with `end_document`)."""
        self._check_open()
        arr = _as_tokens(tokens, self.dtype)
        if arr.size > _MAX_SEQUENCE_LENGTH:
            raise ValueError(f"a sequence of {arr.size} tokens exceeds the format's int32 length limit")
        self._bin.write(arr.tobytes())
        self._sizes.append(arr.size)

    def end_document(self) -> None:
        """Close the current document after the sequences added since the previous one."""
        self._check_open()
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens: Union[Sequence[int], np.ndarray]) -> None:
        """Append a document made of one sequence."""
        self.add_item(tokens)
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: Sequence[int]) -> None:
        """Append many one-sequence documents at once: `tokens` concatenated, `lengths` each one's size."""
        self._check_open()
        arr = _as_tokens(tokens, self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size and (lengths.min() < 0 or lengths.max() > _MAX_SEQUENCE_LENGTH):
            raise ValueError(f"document lengths must lie in [0, {_MAX_SEQUENCE_LENGTH}]")
        if int(lengths.sum()) != arr.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {arr.size} tokens were given")
        self._bin.write(arr.tobytes())
        first = len(self._sizes)
        self._sizes.extend(lengths.astype(np.int32).tolist())
        self._doc_idx.extend(range(first + 1, first + lengths.size + 1))

    def merge(self, other_prefix: str) -> None:
        """Append every document of an existing dataset (same dtype) after those written so far."""
        self._check_open()
        other = IndexedDataset(other_prefix)
        try:
            if other.dtype != self.dtype:
                raise DataError(f"cannot merge {other_prefix} ({other.dtype}) into {self.prefix} ({self.dtype}); "
                                f"all merged datasets must share one token dtype")
            if len(self._doc_idx) and self._doc_idx[-1] != len(self._sizes):
                raise ValueError(f"{self.prefix}: end the open document before merging {other_prefix}")
            offset = len(self._sizes)
            self._sizes.extend(other.sizes.tolist())
            self._doc_idx.extend((other.doc_idx[1:] + offset).tolist())
        finally:
            other.close()
        with open(data_file_path(other_prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, length=16 << 20)

    # ---- completion -----------------------------------------------------------------------
    def finalize(self) -> None:
        """Write the index, flush both files to disk and rename them to PREFIX.bin/.idx."""
        self._check_open()
        if self._doc_idx[-1] != len(self._sizes):
            raise ValueError(f"{self.prefix}: {len(self._sizes) - self._doc_idx[-1]} sequence(s) were added "
                             f"after the last end_document(); close the document before finalize()")
        self._bin.flush()  # kept open, and so locked, until renamed: it is never taken for a stale file
        self._tmp_idx = self._tmp_bin[: -len(".bin.tmp")] + ".idx.tmp"
        with open(self._tmp_idx, "wb") as idx:
            lock_temporary(idx.fileno())
            _write_index(idx, self._code, self.dtype.itemsize, self._sizes, self._doc_idx)
            idx.flush()
            # Drop a stale index first: a crash between the renames then leaves a .bin without an
            # .idx (a clear "missing file" error) rather than an old index over new tokens.
            final_bin, final_idx = data_file_path(self.prefix), index_file_path(self.prefix)
            if os.path.exists(final_idx):
                os.remove(final_idx)
            atomic_replace(self._tmp_bin, final_bin)  # each is on disk before it takes its final name
            atomic_replace(self._tmp_idx, final_idx)
        self._bin.close()
        self._closed = True

    def abort(self) -> None:
        """Discard everything written; the final paths are left untouched."""
        if self._closed:
            return
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if path is not None and os.path.exists(path):
                os.remove(path)
        self._closed = True

    @property
    def num_sequences(self) -> int:
        return len(self._sizes)

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"writer for {self.prefix} is already finalized or aborted")

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()


def _write_index(out, code: int, itemsize: int, sizes: array, doc_idx: array) -> None:
    sizes_np = np.frombuffer(sizes, dtype=np.int32) if len(sizes) else np.zeros(0, np.int32)
    pointers = np.zeros(len(sizes_np), dtype=np.int64)
    np.cumsum(sizes_np[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= itemsize
    out.write(_HEADER.pack(MAGIC, VERSION, code, len(sizes_np), len(doc_idx)))
    out.write(sizes_np.astype("<i4", copy=False).tobytes())
    out.write(pointers.astype("<i8", copy=False).tobytes())
    out.write(np.asarray(doc_idx, dtype="<i8").tobytes())


class IndexedDataset:
    """Read-only memmap view of PREFIX.bin/.idx, validated at open.

    `ds[i]` is sequence i as a zero-copy numpy view into the .bin. A truncated or corrupt pair
    raises DataError naming the file when opened, never garbage later.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found; expected the .bin/.idx pair written by "
                                        f"megamu-preprocess (prefix {self.prefix})")
        self._idx_map = _map_file(idx_path)
        self._bin_map = _map_file(bin_path)
        try:
            self._parse_index(idx_path, bin_path)
        except Exception:
            self.close()
            raise

    def _parse_index(self, idx_path: str, bin_path: str) -> None:
        buf = self._idx_map if self._idx_map is not None else b""
        if len(buf) < _HEADER.size:
            raise DataError(f"{idx_path}: {len(buf)} bytes, shorter than the {_HEADER.size}-byte MMIDIDX header "
                            f"(truncated?); {REBUILD}")
        magic, version, code, n_seq, n_doc_idx = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            raise DataError(f"{idx_path}: bad magic {magic!r}, expected {MAGIC!r}; not an MMIDIDX index file; point "
                            f"data.path at the output of megamu-preprocess (or Megatron's preprocess_data.py)")
        if version != VERSION:
            raise DataError(f"{idx_path}: index version {version}, only version {VERSION} is supported; {REBUILD}")
        if code not in DTYPE_CODES:
            raise DataError(f"{idx_path}: unknown dtype code {code}; valid codes are {sorted(DTYPE_CODES)}")
        self.dtype = DTYPE_CODES[code]
        expected = _HEADER.size + 12 * n_seq + 8 * n_doc_idx
        if len(buf) != expected:
            raise DataError(f"{idx_path}: {len(buf)} bytes, but its header ({n_seq} sequences, {n_doc_idx} "
                            f"document-index entries) implies {expected}; the file is truncated or corrupt; "
                            f"{REBUILD}")
        offset = _HEADER.size
        self.sizes = np.frombuffer(buf, dtype="<i4", count=n_seq, offset=offset)
        offset += 4 * n_seq
        self.pointers = np.frombuffer(buf, dtype="<i8", count=n_seq, offset=offset)
        offset += 8 * n_seq
        self.doc_idx = np.frombuffer(buf, dtype="<i8", count=n_doc_idx, offset=offset)
        self._check_consistency(idx_path, bin_path, n_seq)
        n_tokens = os.path.getsize(bin_path) // self.dtype.itemsize
        self._tokens = (np.frombuffer(self._bin_map, dtype=self.dtype.newbyteorder("<"), count=n_tokens)
                        if n_tokens else np.zeros(0, dtype=self.dtype))

    def _check_consistency(self, idx_path: str, bin_path: str, n_seq: int) -> None:
        bin_size = os.path.getsize(bin_path)
        itemsize = self.dtype.itemsize
        if n_seq:
            if self.sizes.min() < 0:
                raise DataError(f"{idx_path}: negative sequence length at {int(np.argmin(self.sizes))}; corrupt index; "
                                f"{REBUILD}")
            expected = np.zeros(n_seq, dtype=np.int64)
            np.cumsum(self.sizes[:-1], dtype=np.int64, out=expected[1:])
            expected *= itemsize
            bad = np.flatnonzero(expected != self.pointers)
            if bad.size:
                i = int(bad[0])
                raise DataError(f"{idx_path}: sequence {i} points at byte {int(self.pointers[i])}, but the lengths "
                                f"before it put it at {int(expected[i])}; corrupt index; {REBUILD}")
        data_bytes = int(self.sizes.sum(dtype=np.int64)) * itemsize
        if data_bytes != bin_size:
            raise DataError(f"{bin_path}: {bin_size} bytes, but {idx_path} describes {data_bytes} "
                            f"({self.sizes.size} sequences of {self.dtype}); the pair is truncated or mismatched; "
                            f"{REBUILD}")
        d = self.doc_idx
        if d.size == 0 or d[0] != 0 or d[-1] != n_seq:
            first = int(d[0]) if d.size else None
            last = int(d[-1]) if d.size else None
            raise DataError(f"{idx_path}: document index must start at 0 and end at the sequence count {n_seq}, "
                            f"got first={first}, last={last}; corrupt index; {REBUILD}")
        if d.size > 1 and np.any(np.diff(d) < 0):
            raise DataError(f"{idx_path}: document index is not monotone; corrupt index; {REBUILD}")

    # ---- access ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.sizes.size)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i, as a read-only view (no copy)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        i %= n
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of "
                             f"{self.prefix} (length {size})")
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start:start + length]

    @property
    def num_documents(self) -> int:
        return int(self.doc_idx.size) - 1

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.size)

    def max_token_id(self, chunk: int = 1 << 26) -> int:
        """The largest token id in the .bin (-1 when empty), scanned in chunks so memory stays bounded."""
        return max((int(self._tokens[i:i + chunk].max()) for i in range(0, self.num_tokens, chunk)), default=-1)

    def document(self, k: int) -> list[np.ndarray]:
        """The sequences of document k."""
        start, end = int(self.doc_idx[k]), int(self.doc_idx[k + 1])
        return [self.get(i) for i in range(start, end)]

    def close(self) -> None:
        # Views into the maps must go first, or mmap.close() refuses (exported buffers).
        for name in ("sizes", "pointers", "doc_idx", "_tokens"):
            self.__dict__.pop(name, None)
        for name in ("_idx_map", "_bin_map"):
            m = self.__dict__.pop(name, None)
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass  # a caller still holds a view; the map closes when the last view is freed

    # Memory maps cannot be pickled: worker processes reopen the files from the prefix.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __enter__(self) -> "IndexedDataset":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map_file(path: str) -> Optional[mmap.mmap]:
    """Read-only map of a file; None for an empty file (mmap cannot map zero bytes)."""
    if os.path.getsize(path) == 0:
        return None
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def merge_datasets(prefixes: Iterable[str], out_prefix: str) -> None:
    """Concatenate datasets (documents in the given order) into OUT_PREFIX.bin/.idx."""
    prefixes = list(prefixes)
    if not prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    for prefix in prefixes:
        for path in (index_file_path(prefix), data_file_path(prefix)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found (merge input prefix {prefix})")
    with IndexedDataset(prefixes[0]) as first:
        dtype = first.dtype
    with IndexedDatasetWriter(out_prefix, dtype) as writer:
        for prefix in prefixes:
            writer.merge(prefix)
