"""atomic_write: readers see the old file or the complete new one, never a partial write."""
from __future__ import annotations

import os

import pytest

from megamu.fileio import atomic_replace, atomic_write


class Interrupted(Exception):
    pass


def test_clean_exit_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "status.json"
    path.write_text("old")
    with atomic_write(str(path)) as f:
        f.write("new")
        assert path.read_text() == "old"  # nothing visible before the block ends
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["status.json"]


def test_exception_inside_the_block_keeps_the_old_content(tmp_path):
    path = tmp_path / "pointer"
    path.write_text("global_step2\n")
    with pytest.raises(Interrupted):
        with atomic_write(str(path)) as f:
            f.write("global_step4\n")
            raise Interrupted
    assert path.read_text() == "global_step2\n"
    assert os.listdir(tmp_path) == ["pointer"]


def test_exception_writing_a_new_path_leaves_no_file(tmp_path):
    path = tmp_path / "index.npy"
    with pytest.raises(Interrupted):
        with atomic_write(str(path), "wb") as f:
            f.write(b"\x93NUMPY")
            raise Interrupted
    assert os.listdir(tmp_path) == []


def test_only_write_modes_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_write(str(tmp_path / "x"), "a"):
            pass


def test_atomic_replace_moves_a_finished_file_into_place(tmp_path):
    tmp, path = tmp_path / "d.bin.tmp", tmp_path / "d.bin"
    tmp.write_bytes(b"tokens")
    path.write_bytes(b"stale")
    atomic_replace(str(tmp), str(path))
    assert path.read_bytes() == b"tokens"
    assert os.listdir(tmp_path) == ["d.bin"]
