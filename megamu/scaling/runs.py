"""Read one loss point per run directory from its metrics.jsonl (DESIGN.md, "Run directory").

The point is the train loss (mean of the last `smooth` train records up to the chosen step,
since single-batch losses are noisy) or the val loss (the last eval record up to it, already an
average over many batches, so not smoothed again: averaging evals at different steps would mix
in the loss's own decrease). Records before `min_step` are never used.

Default `min_step`: NanoLM fits losses from beyond 5k steps, where μP transfer has settled and
the warm-up transient is over. Short runs (demos, CI, small ladders) never get there, so the
default is min(5000, half the run's last step): long runs follow NanoLM, short ones still skip
their first half, which holds the warm-up and the steep early drop.

A run that was resumed may log a step twice; the later record (the resumed run's) wins.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import yaml

from megamu.scaling.fit import FitError
from megamu.scaling.points import LossPoint
from megamu.training.metrics import METRICS_FILE
from megamu.training.metrics import read_metrics as read_run_metrics

NANOLM_MIN_STEP = 5000


def read_metrics(run_dir: str) -> tuple:
    """Return (meta, train records, eval records) of a run, records sorted by step (FitError if unreadable)."""
    try:
        return read_run_metrics(run_dir)
    except (OSError, ValueError) as exc:
        raise FitError(str(exc)) from None


def distinct_runs(run_dirs: Sequence[str]) -> None:
    """Refuse a run given twice: it would count as a second run (a fake seed, a narrower interval)."""
    seen: dict = {}
    for run_dir in run_dirs:
        real = os.path.realpath(run_dir)
        if real in seen:
            raise FitError(f"run {run_dir} is given twice (also as {seen[real]}): each run counts once; "
                           "drop the repeat")
        seen[real] = run_dir


def default_min_step(last_step: int) -> int:
    return min(NANOLM_MIN_STEP, last_step // 2)


def read_run_point(
    run_dir: str,
    metric: str = "train",
    at_step: Optional[int] = None,
    at_tokens: Optional[float] = None,
    smooth: int = 1,
    min_step: Optional[int] = None,
) -> LossPoint:
    """The run's loss at `at_step`, at `at_tokens`, or at its end (neither given)."""
    if metric not in ("train", "val"):
        raise FitError(f"metric must be train or val, got {metric!r}")
    if at_step is not None and at_tokens is not None:
        raise FitError("give at most one of --at-step and --at-tokens")
    if smooth < 1:
        raise FitError(f"--smooth must be at least 1, got {smooth}")
    if min_step is not None and min_step < 0:
        raise FitError(f"--min-step must not be negative, got {min_step}")
    meta, train, evals = read_metrics(run_dir)
    name = os.path.basename(os.path.normpath(run_dir))
    records = train if metric == "train" else evals
    if not records:
        raise FitError(f"run {run_dir} has no {'train' if metric == 'train' else 'eval'} records")

    last_step = max(r["step"] for r in train + evals)
    if at_step is not None:
        if last_step < at_step:
            raise FitError(f"run {run_dir} stopped at step {last_step}, before --at-step {at_step}")
        records = [r for r in records if r["step"] <= at_step]
    elif at_tokens is not None:
        reached = max(r.get("tokens", 0) for r in train + evals)
        if reached < at_tokens:
            raise FitError(f"run {run_dir} stopped at {reached:.4g} tokens, before --at-tokens {at_tokens:.4g}")
        records = [r for r in records if r["tokens"] <= at_tokens]
    floor_step = default_min_step(last_step) if min_step is None else min_step
    records = [r for r in records if r["step"] >= floor_step]
    if not records:
        raise FitError(
            f"run {run_dir} has no {metric} record between step {floor_step} (--min-step) and the chosen point: "
            "lower --min-step or choose a later point"
        )

    loss_key = "loss" if metric == "train" else "val_loss"
    window = records[-smooth:] if metric == "train" else records[-1:]
    losses = [float(r[loss_key]) for r in window]
    bad = [r["step"] for r, v in zip(window, losses) if not math.isfinite(v)]
    if bad:
        raise FitError(f"run {run_dir}: {metric} loss is not finite at step(s) {bad} (diverged?); drop the run")
    last = window[-1]
    if "params" not in meta:
        raise FitError(f"{os.path.join(run_dir, METRICS_FILE)}: the meta record has no params")
    return LossPoint(
        name=name,
        loss=sum(losses) / len(losses),
        params=float(meta["params"]),
        tokens=float(last["tokens"]) if "tokens" in last else None,
        flops=float(last["flops"]) if "flops" in last else None,
        width=meta.get("hidden_size"),
        step=int(last["step"]),
        seed=run_seed(run_dir),
    )


def run_seed(run_dir: str) -> Optional[int]:
    """train.seed from the run's resolved config.yaml; None when the run directory has none."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    seed = (config.get("train") or {}).get("seed")
    return int(seed) if seed is not None else None
