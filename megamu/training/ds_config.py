"""DeepSpeed's config: the ZeRO/communication settings come from a ds_configs/*.json file; batch
sizes, gradient clipping and precision are derived from megamu's config (one source of truth).

A json that sets a derived field to a different value is an error naming both, never a silent
override; a json that tries to own the optimizer or the LR schedule is refused, because megamu
builds the μP param groups and its schedules preserve their LR multipliers.
"""
from __future__ import annotations

import json
import os
from typing import Any

from megamu.config import Config, ConfigError, accumulation_steps
from megamu.runtime import train_dtype


def default_zero_stage(cfg: Config, dp_size: int) -> int:
    """The ZeRO stage used when train.deepspeed_config is unset: 1 (ds_configs/zero1.json), except 0 with a
    single data-parallel rank, where there is nothing to partition and ZeRO 1's flat-buffer copies only cost
    time (about 4% of a CPU step). Muon keeps ZeRO 1: DeepSpeed runs it only inside the ZeRO optimizers."""
    return 1 if dp_size > 1 or cfg.train.optimizer == "muon" else 0

# Quiet by default: megamu prints its own progress.
_DEFAULTS = {"steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def load_ds_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"train.deepspeed_config: {path} not found (ship one of ds_configs/zero{{0,1,2,3}}.json)")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    return raw


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _put(ds: dict[str, Any], key: str, value: Any, megamu_key: str, path: str) -> None:
    if key in ds and ds[key] != value:
        raise ConfigError(f"{path}: '{key}' = {ds[key]!r} disagrees with {megamu_key} (which gives {value!r}); "
                          f"megamu derives it, so remove '{key}' from {path} or change {megamu_key}")
    ds[key] = value


def build_ds_config(cfg: Config, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for this run, validated against megamu's config."""
    if cfg.train.deepspeed_config:
        path = cfg.train.deepspeed_config
        ds = load_ds_json(path)
    else:
        stage = default_zero_stage(cfg, dp_size)
        path = f"the default DeepSpeed config (ZeRO {stage})"
        ds = {"zero_optimization": {"stage": stage}}
    for owned, by in (("optimizer", "train.optimizer / train.lr / train.beta1 ..."),
                      ("scheduler", "train.schedule (DeepSpeed's schedulers overwrite μP's per-group LRs)")):
        if owned in ds:
            raise ConfigError(f"{path}: remove the '{owned}' section; megamu sets it from {by}")
    t = cfg.train
    _put(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", path)
    _put(ds, "gradient_accumulation_steps", accumulation_steps(cfg, dp_size),
         "train.global_batch_size / (train.micro_batch_size × data-parallel size)", path)
    _put(ds, "train_batch_size", t.global_batch_size, "train.global_batch_size", path)
    _put(ds, "gradient_clipping", float(t.grad_clip), "train.grad_clip", path)
    if ds.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"{path}: fp16 is not supported; remove 'fp16' (precision comes from train.dtype)")
    want_bf16 = train_dtype(t.dtype) == "bf16"
    has_bf16 = ds.get("bf16", {}).get("enabled", want_bf16)
    if has_bf16 != want_bf16:
        raise ConfigError(f"{path}: 'bf16.enabled' = {has_bf16} disagrees with train.dtype={t.dtype} on this "
                          f"machine (bf16 = {want_bf16}); remove 'bf16' from {path} or change train.dtype")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": want_bf16}
    for key, value in _DEFAULTS.items():
        ds.setdefault(key, value)
    _check_supported(cfg, ds, path)
    return ds


def _check_supported(cfg: Config, ds: dict[str, Any], path: str) -> None:
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    if cfg.train.optimizer == "muon":
        if stage == 0:
            raise ConfigError(f"train.optimizer=muon with {path} (ZeRO stage 0): DeepSpeed runs Muon's momentum and "
                              f"Newton-Schulz steps only inside the ZeRO 1/2/3 optimizers, so matrices would get "
                              f"raw-gradient updates; use ds_configs/zero1.json or zero2.json")
        if cfg.parallel.tensor > 1:
            raise ConfigError("train.optimizer=muon with parallel.tensor > 1: DeepSpeed orthogonalises each rank's "
                              "shard rather than the full matrix; use train.optimizer=adamw or parallel.tensor=1")
    if cfg.parallel.pipeline > 1 and stage > 1:
        raise ConfigError(f"parallel.pipeline={cfg.parallel.pipeline} with ZeRO stage {stage} ({path}): DeepSpeed's "
                          f"pipeline engine supports ZeRO 0 and 1 only; use ds_configs/zero1.json")
