"""DeepSpeed's universal checkpoint: how a ZeRO 1/2 checkpoint resumes on another data-parallel size.

ZeRO 1/2 save each DP rank's flat partition of the optimizer state, and DeepSpeed's ordinary load refuses
another DP size. `deepspeed.checkpoint.ds_to_universal` rewrites a tag as one folder per parameter (fp32
weight, Adam's exp_avg and exp_avg_sq, step), which an engine built with `checkpoint.load_universal`
partitions anew for its own DP size. The converter also merges each parameter's TP slices, by the
patterns of `universal_info` that every save carries (which dim each parameter is split on); under PP it
reads each stage's partitions under that stage's parameter names, and the engine reloads every stage's
weights from the converted folder.

The conversion goes into the sibling folder `<tag>_universal` (store.py has rank 0 write it while the
others wait, as the checkpoint directory is shared), renamed into place only once complete, so a folder of
that name is always a finished conversion, which a later resume reuses.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
from typing import Any

from megamu.config import Config
from megamu.model.mup import Role
from megamu.model.transformer import parameter_layout, stage_name

UNIVERSAL_SUFFIX = "_universal"


def universal_tag(tag: str) -> str:
    return tag + UNIVERSAL_SUFFIX


def universal_info(cfg: Config) -> dict[str, Any]:
    """DeepSpeed's `universal_checkpoint_info` for the model of `cfg`: how the converter merges each
    parameter's TP slices, from `parameter_layout` (one exact-name pattern per parameter, under the name the
    engine's module gives it: a pipeline stage's `stage_name`).

    Row-parallel weights are concatenated on dim 1 (column-parallel ones on dim 0, the converter's default);
    replicated ones are averaged, which leaves identical replicas as they are; the vocabulary-parallel
    embedding and readout are declared with the padded vocabulary as their original size, so the converter
    strips no padding and the loader adds none: a reload at the saved TP size gets back exactly its slices.
    No parameter is shared between pipeline stages (embedding and readout are separate), so no pattern is
    pipeline-replicated.
    """
    from deepspeed.checkpoint.constants import (ORIGINAL_VOCAB_SIZE, PARAMETER_TO_AVERAGE_PATTERNS,
                                                PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
                                                UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE,
                                                VOCABULARY_PARAMETER_PATTERNS)

    patterns: dict[str, list[str]] = {PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [], PARAMETER_TO_AVERAGE_PATTERNS: [],
                                      VOCABULARY_PARAMETER_PATTERNS: []}
    for name, (partition_dim, role) in parameter_layout(cfg).items():
        if role in (Role.EMBEDDING, Role.READOUT):
            kind = VOCABULARY_PARAMETER_PATTERNS
        elif partition_dim is None:
            kind = PARAMETER_TO_AVERAGE_PATTERNS
        elif partition_dim == 1:
            kind = PARAMETER_WITH_ROW_PARALLELISM_PATTERNS
        else:
            continue
        engine_name = stage_name(name) if cfg.parallel.pipeline > 1 else name
        patterns[kind].append(re.escape(engine_name) + r"\Z")  # the converter's re.match anchors only the start
    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            ORIGINAL_VOCAB_SIZE: cfg.padded_vocab_size(), **patterns}


def with_load_universal(ds_config: dict[str, Any]) -> dict[str, Any]:
    """`ds_config` for an engine that loads a universal checkpoint (DeepSpeed reads the flag at load time
    from the config it was built with)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def convert_to_universal(ckpt_dir: str, tag: str) -> None:
    """Write `<tag>_universal` beside checkpoint `tag` with DeepSpeed's converter (one process: the folder is
    shared)."""
    from deepspeed.checkpoint import ds_to_universal

    final = os.path.join(ckpt_dir, universal_tag(tag))
    # The converter also writes `latest_universal` next to its output: inside the scratch folder that goes
    # away with it, rather than beside megamu's own pointer.
    scratch = os.path.join(ckpt_dir, f".{universal_tag(tag)}.partial")
    shutil.rmtree(scratch, ignore_errors=True)  # left by a conversion that crashed
    os.makedirs(scratch)
    staged = os.path.join(scratch, universal_tag(tag))
    # One worker each: process pools forked from a rank with live process groups are not safe.
    args = argparse.Namespace(input_folder=os.path.join(ckpt_dir, tag), output_folder=staged,
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    ds_to_universal.main(args)
    os.replace(staged, final)  # atomic on one file system: the folder appears complete or not at all
    shutil.rmtree(scratch)
