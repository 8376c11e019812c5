"""What a resume may change, checked before anything is loaded or written.

The run's saved `config.yaml` (resolved) is compared with the new resolved config:

- the model's shape or parametrization (any `model.*` key but dropout, `mup.*`, `train.optimizer`) is refused:
  the weights and optimizer state describe the saved model;
- settings that change the schedule or the data are allowed and said once, as `old → new`.

Each checkpoint also records where the data stream stands (`data_position.json`: steps done, samples they
drew, and the size of the train dataset's shuffle), so a resume knows before loading whether the stream can
continue exactly. The train dataset is a permutation over its sample count, so it is kept at the saved count
whenever that still covers the run (the next steps draw the very samples the run would have drawn), and grown,
which reshuffles the samples not yet drawn, only when the run now needs more; the note says which.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

from megamu.checkpoint.merge import run_config
from megamu.config import Config
from megamu.errors import CheckpointError, ConfigError
from megamu.fileio import atomic_write

POSITION_FILE = "data_position.json"
_MODEL_EXEMPT = {"model.dropout"}  # regularisation only: the weights fit either way
_MODEL_KEYS = {"train.optimizer"}  # the optimizer state is the optimizer's own
NOTED_KEYS = ("train.global_batch_size", "train.max_steps", "train.lr", "train.min_lr_ratio", "train.warmup_steps",
              "train.schedule", "train.decay_fraction", "train.weight_decay", "train.beta1", "train.beta2",
              "train.grad_clip", "train.seed", "data.path", "data.paths", "data.split")
# Keys the train dataset's shuffle is built from (besides its size and model.seq_len, which cannot change).
_SHUFFLE_KEYS = ("train.seed", "data.path", "data.paths", "data.split")


@dataclass(frozen=True)
class DataPosition:
    step: int  # optimizer steps done
    consumed_samples: int  # samples those steps drew
    train_samples: int  # the size of the train dataset's shuffle they were drawn from


@dataclass(frozen=True)
class ResumeChanges:
    position: DataPosition  # where the checkpoint left the data
    train_samples: int  # the size of the train dataset's shuffle from now on
    notes: list[str]  # what changes, said once at start-up


def save_data_position(ckpt_dir: str, tag: str, position: DataPosition) -> None:
    """Rank 0, before the checkpoint's vote: a checkpoint the pointer names always has its position."""
    os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
    with atomic_write(os.path.join(ckpt_dir, tag, POSITION_FILE)) as f:
        json.dump(asdict(position), f)


def _read_data_position(ckpt_dir: str, tag: str, saved: Config) -> DataPosition:
    path = os.path.join(ckpt_dir, tag, POSITION_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return DataPosition(**json.load(f))
    # Saved before positions were recorded: as the saved config ran it (checked against the checkpoint on load).
    step = int(tag.rsplit("global_step", 1)[-1])
    t = saved.train
    return DataPosition(step, step * t.global_batch_size, t.max_steps * t.global_batch_size)


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


def changed_keys(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted key → (old, new) for every key whose value differs."""
    before, after = _flat(old), _flat(new)
    return {key: (before[key], after[key]) for key in after if before[key] != after[key]}


def _shown(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} → {new!r}" for key, (old, new) in changes.items())


def _changes_model(key: str) -> bool:
    return key in _MODEL_KEYS or (key.split(".")[0] in ("model", "mup") and key not in _MODEL_EXEMPT)


def _refuse_model_changes(changes: dict[str, tuple[Any, Any]], run_dir: str) -> None:
    refused = {key: change for key, change in changes.items() if _changes_model(key)}
    if refused:
        raise ConfigError(f"train.resume=true: the checkpoint in {run_dir} holds another model than this config "
                          f"describes ({_shown(refused)}); start a new run (another train.out_dir), or restore "
                          f"these keys to their values in {os.path.join(run_dir, 'config.yaml')}")


def _train_samples(position: DataPosition, cfg: Config) -> int:
    """The saved shuffle's size if it still covers every step to train.max_steps, else just enough samples."""
    t = cfg.train
    if position.consumed_samples % t.global_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} does not divide the "
                          f"{position.consumed_samples} samples the checkpoint's {position.step} steps consumed, so "
                          f"no step would start where they stopped; resume with a global batch size dividing "
                          f"{position.consumed_samples} (the saved one does)")
    needed = position.consumed_samples + max(t.max_steps - position.step, 0) * t.global_batch_size
    return max(needed, position.train_samples)


def _data_note(position: DataPosition, train_samples: int, changes: dict[str, tuple[Any, Any]]) -> str:
    where = f"after step {position.step} (sample {position.consumed_samples})"
    reshuffled = [key for key in _SHUFFLE_KEYS if key in changes]
    if reshuffled:
        return (f"the train data {where} comes from a new shuffle of {train_samples} samples, as "
                f"{', '.join(reshuffled)} changed: later steps do not draw what the run would have drawn")
    if train_samples != position.train_samples:
        return (f"the train sample order {where} is reshuffled over {train_samples} samples (was "
                f"{position.train_samples}, too few for the remaining steps): later steps do not draw what the run "
                f"would have drawn, and may repeat samples it drew")
    return (f"the train data continues exactly {where}, in the same shuffle of {train_samples} samples; tokens "
            f"and flops count the samples consumed")


def _notes(position: DataPosition, train_samples: int, changes: dict[str, tuple[Any, Any]], run_dir: str) -> list:
    noted = {key: changes[key] for key in NOTED_KEYS if key in changes}
    if not noted:
        return []
    notes = [f"resuming with settings changed from {os.path.join(run_dir, 'config.yaml')}: {_shown(noted)}"]
    if noted.keys() & {"train.global_batch_size", "train.max_steps", *_SHUFFLE_KEYS}:
        notes.append(_data_note(position, train_samples, changes))
    if "train.global_batch_size" in noted:
        notes.append("validation draws train.eval_iters × train.global_batch_size samples: val_loss from here on "
                     "is measured on another set")
    return notes


def check_resume(cfg: Config, ckpt_dir: str, tag: Optional[str]) -> Optional[ResumeChanges]:
    """What resuming checkpoint `tag` (store.resume_tag's choice) in `ckpt_dir` with `cfg` (resolved) changes,
    or None when there is none. Raises ConfigError for a change the checkpoint cannot take; reads, never
    writes."""
    if tag is None:
        return None
    run_dir = cfg.train.out_dir
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise CheckpointError(f"{run_dir} holds checkpoint {tag} but no config.yaml, so a resume cannot check "
                              f"that the model is unchanged; restore the run's config.yaml or start a new run "
                              f"(another train.out_dir)")
    saved = run_config(run_dir)
    changes = changed_keys(saved, cfg)
    _refuse_model_changes(changes, run_dir)
    position = _read_data_position(ckpt_dir, tag, saved)
    train_samples = _train_samples(position, cfg)
    return ResumeChanges(position, train_samples, _notes(position, train_samples, changes, run_dir))


def check_loaded_position(position: DataPosition, consumed_samples: int, where: str) -> None:
    """The samples the loaded checkpoint says it consumed must be those planned for (older checkpoints lack
    `data_position.json`, and are planned for as their saved config ran)."""
    if consumed_samples != position.consumed_samples:
        raise CheckpointError(f"{where} consumed {consumed_samples} samples, not the {position.consumed_samples} "
                              f"its saved config gives; resume with the train.global_batch_size and "
                              f"train.max_steps it was saved with")
