"""Checkpoints: DeepSpeed save/load behind megamu's complete-checkpoint pointer (store.py, pointer.py), each
complete checkpoint's file list to fall back from a damaged one (manifest.py),
DeepSpeed's universal checkpoint for a change of data-parallel size under ZeRO 1/2 (universal.py), the
saved layout (layout.py), per-rank RNG state (rng.py), DeepSpeed's file layout and shard discovery
(files.py), merging TP shards, or a run directory's checkpoint, into one state dict (merge.py), starting a
run from such a state dict at any layout (initial.py, train.init_from), and what a
resume may change of the saved config and data position (compat.py)."""
from megamu.checkpoint.compat import (DataPosition, ResumeChanges, check_loaded_position, check_resume,
                                      save_data_position)
from megamu.checkpoint.files import load_model_shards, model_shard_paths
from megamu.checkpoint.merge import merge_run_checkpoint, merge_tp_shards, run_config
from megamu.checkpoint.pointer import POINTER, read_pointer, tag_for, write_pointer
from megamu.checkpoint.rng import rng_state, set_rng_state
from megamu.checkpoint.store import (ResumePlan, current_layout, load_checkpoint, plan_resume, resume_tag,
                                     save_checkpoint)
from megamu.checkpoint.universal import with_load_universal

__all__ = ["POINTER", "DataPosition", "ResumeChanges", "ResumePlan", "check_loaded_position", "check_resume",
           "current_layout", "load_checkpoint", "load_model_shards", "merge_run_checkpoint", "merge_tp_shards",
           "model_shard_paths", "plan_resume", "read_pointer", "resume_tag", "rng_state", "run_config",
           "save_checkpoint", "save_data_position", "set_rng_state", "tag_for", "with_load_universal", "write_pointer"]
