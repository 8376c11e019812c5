"""MMIDIDX v1 files: byte layout checked by a reader written here from the format spec, round trips,
merge, atomic writes, and clear errors for truncated or corrupt files."""
from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from megamu.data.indexed import (IndexedDataset, IndexedDatasetWriter, best_dtype, merge_datasets)
from megamu.errors import DataError

SPEC_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}


def read_mmidx_from_spec(prefix: str) -> tuple[np.dtype, list[np.ndarray], np.ndarray]:
    """Independent reader (struct + numpy.fromfile) following the published layout, not megamu's code."""
    with open(prefix + ".idx", "rb") as f:
        assert f.read(9) == b"MMIDIDX\x00\x00"
        (version,) = struct.unpack("<Q", f.read(8))
        (code,) = struct.unpack("<B", f.read(1))
        (n_seq,) = struct.unpack("<Q", f.read(8))
        (n_doc,) = struct.unpack("<Q", f.read(8))
        sizes = np.fromfile(f, dtype="<i4", count=n_seq)
        pointers = np.fromfile(f, dtype="<i8", count=n_seq)
        doc_idx = np.fromfile(f, dtype="<i8", count=n_doc)
        assert f.read() == b"", "trailing bytes after the document index"
    assert version == 1
    dtype = np.dtype(SPEC_DTYPES[code])
    tokens = np.fromfile(prefix + ".bin", dtype=dtype)
    seqs = [tokens[p // dtype.itemsize: p // dtype.itemsize + s] for p, s in zip(pointers, sizes)]
    return dtype, seqs, doc_idx


def random_docs(rng: np.random.Generator, n: int, high: int) -> list[np.ndarray]:
    return [rng.integers(0, high, size=int(rng.integers(0, 40))) for _ in range(n)]


def write(prefix: str, docs: list, dtype) -> None:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)


def test_best_dtype_threshold():
    assert best_dtype(32000) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(128256) == np.int32


@pytest.mark.parametrize("vocab", [1000, 100_000])
def test_spec_reader_reads_our_files(tmp_path, vocab):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 50, vocab)
    prefix = str(tmp_path / "d")
    write(prefix, docs, best_dtype(vocab))

    dtype, seqs, doc_idx = read_mmidx_from_spec(prefix)
    assert dtype == best_dtype(vocab)
    assert doc_idx.tolist() == list(range(51))  # one sequence per document, index starts with 0
    for doc, seq in zip(docs, seqs):
        np.testing.assert_array_equal(seq, doc)

    ds = IndexedDataset(prefix)
    assert len(ds) == 50 and ds.num_documents == 50 and ds.dtype == dtype
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)


def test_reads_file_laid_out_by_hand(tmp_path):
    """A file built byte by byte as Megatron's writer lays it out (multi-sequence documents) loads here."""
    seqs = [[7, 8, 9], [10], [11, 12], [13]]
    doc_idx = [0, 2, 4]  # two documents of two sequences each
    prefix = str(tmp_path / "megatron")
    with open(prefix + ".bin", "wb") as f:
        for s in seqs:
            f.write(np.asarray(s, dtype=np.int32).tobytes())
    sizes = np.array([len(s) for s in seqs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) * 4
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4))
        f.write(struct.pack("<Q", len(seqs)) + struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes() + pointers.tobytes() + np.asarray(doc_idx, np.int64).tobytes())

    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32
    assert [ds[i].tolist() for i in range(len(ds))] == seqs
    assert ds.doc_idx.tolist() == doc_idx
    assert [s.tolist() for s in ds.document(1)] == [[11, 12], [13]]
    assert ds.get(0, offset=1, length=2).tolist() == [8, 9]


def test_views_are_zero_copy_and_bounds_checked(tmp_path):
    prefix = str(tmp_path / "d")
    write(prefix, [[1, 2, 3], [4, 5]], np.uint16)
    ds = IndexedDataset(prefix)
    view = ds[1]
    assert not view.flags.owndata and not view.flags.writeable
    assert ds[-1].tolist() == [4, 5]
    with pytest.raises(IndexError, match="out of range"):
        ds[2]
    with pytest.raises(IndexError, match="out of range"):
        ds.get(0, offset=2, length=2)


def test_multi_sequence_documents_and_pickling(tmp_path):
    prefix = str(tmp_path / "d")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_item([1, 2])
        writer.add_item([3])
        writer.end_document()
        writer.add_document([4])
    ds = pickle.loads(pickle.dumps(IndexedDataset(prefix)))  # DataLoader workers reopen by prefix
    assert ds.doc_idx.tolist() == [0, 2, 3]
    _, seqs, doc_idx = read_mmidx_from_spec(prefix)
    assert [s.tolist() for s in seqs] == [[1, 2], [3], [4]] and doc_idx.tolist() == [0, 2, 3]


def test_refuses_ids_the_dtype_cannot_hold(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as writer:
        with pytest.raises(ValueError, match="outside uint16's range"):
            writer.add_document([1, 70000])
        with pytest.raises(ValueError, match="outside uint16's range"):
            writer.add_document([-1])


def test_merge(tmp_path):
    rng = np.random.default_rng(1)
    parts = [random_docs(rng, n, 500) for n in (5, 0, 7)]
    prefixes = []
    for k, docs in enumerate(parts):
        prefixes.append(str(tmp_path / f"p{k}"))
        write(prefixes[-1], docs, np.uint16)
    merge_datasets(prefixes, str(tmp_path / "merged"))

    dtype, seqs, doc_idx = read_mmidx_from_spec(str(tmp_path / "merged"))
    expected = [d for docs in parts for d in docs]
    assert len(seqs) == len(expected) and doc_idx.tolist() == list(range(len(expected) + 1))
    for seq, doc in zip(seqs, expected):
        np.testing.assert_array_equal(seq, doc)


def test_merge_refuses_mixed_dtypes(tmp_path):
    write(str(tmp_path / "a"), [[1]], np.uint16)
    write(str(tmp_path / "b"), [[1]], np.int32)
    with pytest.raises(ValueError, match="share one token dtype"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m.bin") and not os.path.exists(tmp_path / "m.idx")


def test_interrupted_write_leaves_no_files(tmp_path):
    prefix = str(tmp_path / "d")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document([1, 2, 3])
            assert not os.path.exists(prefix + ".bin")  # nothing under the final name mid-write
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_missing_output_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        IndexedDatasetWriter(str(tmp_path / "nope" / "d"), np.uint16)


def _corrupt_idx(prefix: str, offset: int, data: bytes) -> None:
    with open(prefix + ".idx", "r+b") as f:
        f.seek(offset)
        f.write(data)


CORRUPTIONS = {
    "truncated idx": (lambda p: os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 8), "truncated or corrupt"),
    "header only": (lambda p: os.truncate(p + ".idx", 12), "shorter than"),
    "truncated bin": (lambda p: os.truncate(p + ".bin", os.path.getsize(p + ".bin") - 2), "truncated or mismatched"),
    "bad magic": (lambda p: _corrupt_idx(p, 0, b"NOTANIDX!"), "bad magic"),
    "bad version": (lambda p: _corrupt_idx(p, 9, struct.pack("<Q", 2)), "version 2"),
    "bad dtype code": (lambda p: _corrupt_idx(p, 17, b"\x09"), "unknown dtype code 9"),
    "bad pointer": (lambda p: _corrupt_idx(p, 34 + 4 * 3 + 8, struct.pack("<q", 5)), "sequence 1 points at byte 5"),
    "bad doc index": (lambda p: _corrupt_idx(p, 34 + 12 * 3 + 8 * 3, struct.pack("<q", 2)), "end at the sequence"),
    "missing bin": (lambda p: os.remove(p + ".bin"), "not found"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_files_fail_at_open_naming_the_file(tmp_path, case):
    prefix = str(tmp_path / "d")
    write(prefix, [[1, 2], [3, 4, 5], [6]], np.uint16)
    damage, message = CORRUPTIONS[case]
    damage(prefix)
    with pytest.raises((DataError, FileNotFoundError), match=message) as info:
        IndexedDataset(prefix)
    assert prefix in str(info.value)
