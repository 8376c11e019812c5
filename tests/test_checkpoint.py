"""megamu.checkpoint's file handling without a training run: the pointer, per-rank RNG files, and
the user-fixable problems (no pointer, missing or ZeRO-3 shard files, another world size) raised as
CheckpointError naming the file."""
from __future__ import annotations

import random

import pytest
import torch

from megamu.checkpoint import (POINTER, load_model_shards, merge_run_checkpoint, model_shard_paths, read_pointer,
                               tag_for, write_pointer)
from megamu.checkpoint.rng import load_rng_state, save_rng_state
from megamu.config import load_config, save_config
from megamu.errors import CheckpointError


def test_pointer_round_trip_and_absence(tmp_path):
    assert read_pointer(str(tmp_path)) is None
    write_pointer(str(tmp_path), tag_for(7))
    assert read_pointer(str(tmp_path)) == "global_step7"
    assert sorted(p.name for p in tmp_path.iterdir()) == [POINTER]


def test_rng_file_restores_the_streams_and_its_absence_names_the_file(tmp_path):
    (tmp_path / "global_step1").mkdir()
    random.seed(3)
    save_rng_state(str(tmp_path), "global_step1", 0)
    want = (random.random(), torch.rand(2))
    load_rng_state(str(tmp_path), "global_step1", 0)
    assert random.random() == want[0] and torch.equal(torch.rand(2), want[1])
    with pytest.raises(CheckpointError, match=r"rng_rank00001.pt, the random state of rank 1 in checkpoint "
                                              r"global_step1, is missing or corrupt \(it does not exist\)"):
        load_rng_state(str(tmp_path), "global_step1", 1)


def _touch(folder, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


@pytest.mark.parametrize("files, message", [
    (None, "global_step2 does not exist"),
    ((), "holds no mp_rank_XX_model_states.pt files"),
    (("zero_pp_rank_0_mp_rank_00_model_states.pt",), "is a ZeRO stage 3 checkpoint"),
    (("mp_rank_00_model_states.pt", "mp_rank_02_model_states.pt"), r"ranks \[0, 2\] found; ranks 0..2"),
])
def test_unusable_shard_files_raise_checkpoint_error_naming_the_folder(tmp_path, files, message):
    if files is not None:
        _touch(tmp_path / "global_step2", *files)
    with pytest.raises(CheckpointError, match=message) as info:
        model_shard_paths(str(tmp_path), "global_step2")
    assert str(tmp_path / "global_step2") in str(info.value)


def test_shards_are_found_in_rank_order_and_need_a_module_entry(tmp_path):
    folder = tmp_path / "global_step2"
    folder.mkdir()
    for rank in (1, 0):
        torch.save({"module": {"w": torch.full((1,), float(rank))}}, folder / f"mp_rank_{rank:02d}_model_states.pt")
    assert [float(s["w"]) for s in load_model_shards(str(tmp_path), "global_step2")] == [0.0, 1.0]
    torch.save({}, folder / "mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt has no 'module' entry"):
        load_model_shards(str(tmp_path), "global_step2")


def test_merging_a_run_without_a_complete_checkpoint_names_the_pointer(tmp_path):
    save_config(load_config(None, ["model.vocab_size=512"]), str(tmp_path / "config.yaml"))
    with pytest.raises(CheckpointError, match=f"{POINTER} not found.*pass --tag"):
        merge_run_checkpoint(str(tmp_path))
