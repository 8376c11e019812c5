"""DeepSpeed's config: the ZeRO/communication settings come from a ds_configs/*.json file; batch
sizes, gradient clipping and precision are derived from megamu's config (one source of truth).

A json that sets a derived field to a different value is an error naming both, never a silent
override; a json that tries to own the optimizer or the LR schedule is refused, because megamu
builds the μP param groups and its schedules preserve their LR multipliers.

bf16 (`train.dtype=bf16`, on a GPU or through DeepSpeed's CPU accelerator, the same code): the module's
weights and activations are bf16, the master weights and AdamW's state fp32 (what the optimizer megamu
builds steps), and gradients accumulate over micro batches in fp32 (`data_types.grad_accum_dtype`). That
choice picks DeepSpeed's wrapper, measured on DeepSpeed 0.19 (tests/test_bf16.py):
- ZeRO 0: `FP16_UnfusedOptimizer` (bf16 mode). DeepSpeed has no fp32 accumulation here (it raises for
  grad_accum_dtype fp32 without ZeRO), so gradients live in the bf16 `.grad`: megamu allows ZeRO 0 in bf16
  only without accumulation steps, and a bf16 run without a DeepSpeed json defaults to ZeRO 1.
- ZeRO 1: `BF16_Optimizer` (fp32 gradient buffers; DeepSpeed picks it for bf16 + fp32 accumulation).
- ZeRO 2: `DeepSpeedZeroOptimizer` with fp32 gradient partitions (ZeRO 3 in bf16 is not measured here).
Gradients are also reduced over data parallelism in fp32 (`communication_data_type`, a default a json may
set to bf16), since DeepSpeed's bf16 default casts the fp32 sums to bf16 for the reduction, even at DP=1.
The bf16 wrappers at ZeRO 0 and 1 skip a non-finite step themselves, before the inner step (so before
megamu's gate, training/step.py). ZeRO 2 would too, after an extra pass over the gradients; megamu turns
that check off (`bf16.check_grad_overflow: false`), so there the gate decides from the norm, as in fp32.
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
    time (about 4% of a CPU step). Muon keeps ZeRO 1: DeepSpeed runs it only inside the ZeRO optimizers.
    bf16 keeps ZeRO 1 too: DeepSpeed accumulates gradients in fp32 only from ZeRO 1 on (module docstring)."""
    keep_zero1 = dp_size > 1 or cfg.train.optimizer == "muon" or train_dtype(cfg.train.dtype) == "bf16"
    return 1 if keep_zero1 else 0

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


def _put(ds: dict[str, Any], key: str, value: Any, megamu_key: str, path: str, section: str = "") -> None:
    """Set `key` (inside `section` when given) to the value megamu derives, refusing a json that disagrees."""
    target = ds.setdefault(section, {}) if section else ds
    name = f"{section}.{key}" if section else key
    if key in target and target[key] != value:
        raise ConfigError(f"{path}: '{name}' = {target[key]!r} disagrees with {megamu_key} (which gives {value!r}); "
                          f"megamu derives it, so remove '{name}' from {path} or change {megamu_key}")
    target[key] = value


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
    _put_precision(cfg, ds, path, want_bf16)
    for key, value in _DEFAULTS.items():
        ds.setdefault(key, value)
    _check_supported(cfg, ds, path)
    return ds


def _put_precision(cfg: Config, ds: dict[str, Any], path: str, bf16: bool) -> None:
    """Gradient accumulation in fp32 wherever DeepSpeed has it, and bf16's non-finite verdict left to the gate."""
    by = f"train.dtype={cfg.train.dtype}"
    if bf16 and zero_stage(ds) == 0:
        # DeepSpeed keeps ZeRO 0's gradients in the bf16 `.grad`: summing micro batches there would round
        # every partial sum to bf16's 8 mantissa bits.
        if ds["gradient_accumulation_steps"] > 1:
            raise ConfigError(f"train.dtype=bf16 with {path} (ZeRO stage 0) and {ds['gradient_accumulation_steps']} "
                              f"gradient accumulation steps: DeepSpeed accumulates ZeRO 0 gradients in bf16, not fp32; "
                              f"use ds_configs/zero1.json, or train.micro_batch_size = train.global_batch_size / "
                              f"data-parallel size")
        _put(ds, "grad_accum_dtype", "bf16", f"{by} at ZeRO 0 (DeepSpeed has no fp32 accumulation there)", path,
             section="data_types")
        return
    _put(ds, "grad_accum_dtype", "fp32", by, path, section="data_types")
    if bf16:
        # DeepSpeed reduces gradients in the model dtype by default, which would round the fp32 sums to bf16
        # (at DP=1 too). A default, not derived: a json may trade that precision for half the traffic.
        ds.setdefault("communication_data_type", "fp32")
        # Off: DeepSpeed's ZeRO 2 would check every gradient once more before its norm, which already
        # tells the gate.
        _put(ds, "check_grad_overflow", False, f"{by} (megamu's non-finite gate decides)", path, section="bf16")


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
