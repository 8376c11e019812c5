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


def test_the_temporary_is_a_unique_name_beside_the_target(tmp_path):
    path = tmp_path / "latest_complete"
    with atomic_write(str(path)) as outer, atomic_write(str(path)) as inner:
        outer.write("outer")
        inner.write("inner")
        temporaries = sorted(os.listdir(tmp_path))
    assert len(temporaries) == 2  # two writers of one path (threads, or ranks sharing a pid namespace)
    assert all(name.startswith("latest_complete.") and name.endswith(".tmp") for name in temporaries)
    assert path.read_text() == "outer"  # the last to finish wins, whole
    assert os.listdir(tmp_path) == ["latest_complete"]


def test_the_written_file_has_the_permissions_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    with atomic_write(str(tmp_path / "atomic")) as f:
        f.write("x")
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(plain).st_mode


def test_the_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    opened, synced = {}, []
    real_open, real_fsync = os.open, os.fsync

    def recording_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = str(path)
        return fd

    def recording_fsync(fd: int) -> None:
        synced.append((opened.get(fd), target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    with atomic_write(str(target)) as f:
        f.write("a: 1\n")
    assert synced[-1] == (str(tmp_path), True)  # last, the directory, once the new name is in it
    assert synced[0][0].endswith(".tmp") and synced[0][1] is False  # first the file, before the rename


def test_a_directory_that_cannot_be_opened_is_not_an_error(tmp_path, monkeypatch):
    real_open = os.open

    def open_files_only(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", path)  # what Windows says for a directory
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_files_only)
    with atomic_write(str(tmp_path / "run_status.json")) as f:
        f.write("{}")
    assert (tmp_path / "run_status.json").read_text() == "{}"
