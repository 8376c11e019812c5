"""Width ladders: the same model at several widths, μP hyper-parameters transferred from the proxy.

Width rule (megamu.scaling.widths, shared with sweeps and the coordinate check): the head dimension
and the grouped-query group size stay the proxy's (more heads as width grows), an explicit MLP width
scales along, mup.base_hidden_size stays the proxy's width (which is what makes the proxy's
hyper-parameters transfer), and under μP mup.attn_mult is pinned to the proxy's α_attn so the
attention scale α_attn/d_head is the proxy's at every rung. Each rung's overrides are derived from
the proxy, not from another rung.

Token budget rule: every rung trains the same number of steps, or tokens ∝ params
(steps = ceil(tokens_per_param · params / tokens per step)), with the proxy's batch and sequence
length throughout.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from megamu.config import Config, ConfigError, fill_vocab_size, load_config, resolve
from megamu.model import param_counts
from megamu.scaling.fit import FitError
from megamu.scaling.launch import MetricRule, RunResult, RunSpec, failed_run_logs
from megamu.scaling.points import LossPoint
from megamu.scaling.predict import predict
from megamu.scaling.runs import read_run_point
from megamu.scaling.widths import width_overrides, width_step


@dataclass(frozen=True)
class TokenBudget:
    """Fixed steps (`steps`; None = the config's train.max_steps) or tokens ∝ params."""

    steps: Optional[int] = None
    tokens_per_param: Optional[float] = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.tokens_per_param is not None:
            raise ConfigError("give either a fixed number of steps or a tokens-per-param ratio, not both")
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"--steps must be positive, got {self.steps}")
        if self.tokens_per_param is not None and not self.tokens_per_param > 0:
            raise ConfigError(f"--tokens-per-param must be positive, got {self.tokens_per_param}")

    def steps_for(self, cfg: Config, params: int) -> int:
        if self.tokens_per_param is None:
            return self.steps or cfg.train.max_steps
        return max(1, math.ceil(self.tokens_per_param * params / cfg.tokens_per_step))


def _config_at(config: Optional[str], overrides: Sequence[str], width: int) -> tuple[Config, list[str]]:
    """The config at `width` and the width overrides that made it (taken from the proxy, not the rung)."""
    base = load_config(config, list(overrides))
    fill_vocab_size(base)
    scaled = width_overrides(base, width)
    cfg = load_config(config, [*overrides, *scaled])
    cfg.model.vocab_size = base.model.vocab_size
    return cfg, scaled


def params_at(config: Optional[str], overrides: Sequence[str], width: int) -> int:
    return param_counts(_config_at(config, overrides, width)[0])["total"]


def width_for_params(config: Optional[str], overrides: Sequence[str], target_params: float) -> int:
    """The width the rule allows (a multiple of head_dim · GQA group) whose parameter count is nearest
    `target_params` (in log)."""
    if not target_params > 0:
        raise ConfigError(f"target parameter count must be positive, got {target_params}")
    step = width_step(load_config(config, list(overrides)))
    best, best_gap, width = step, math.inf, step
    while True:
        params = params_at(config, overrides, width)
        gap = abs(math.log(params / target_params))
        if gap < best_gap:
            best, best_gap = width, gap
        if params > target_params:  # counts grow with width: the next ones are only farther
            return best
        width += step


def plan_ladder(
    config: Optional[str],
    overrides: Sequence[str],
    widths: Sequence[int],
    budget: TokenBudget,
    out_dir: str,
    seeds: Sequence[int] = (),
) -> list[RunSpec]:
    """One run per width, named w<width>, validated before anything is launched.

    With `seeds`, one run per width and seed, named w<width>_s<seed> (train.seed=<seed>): averaging
    seeds is how a small rung's run-to-run noise is kept below the width effect being fitted.
    """
    if not widths:
        raise ConfigError("the ladder needs at least one width (or target parameter count)")
    if len(set(widths)) != len(widths):
        raise ConfigError(f"widths repeat: {list(widths)}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds repeat: {list(seeds)}")
    specs = []
    for width in sorted(widths):
        cfg, scaled = _config_at(config, overrides, width)
        params = param_counts(cfg)["total"]
        steps = budget.steps_for(cfg, params)
        run_overrides = [*overrides, *scaled, f"train.max_steps={steps}"]
        resolve(load_config(config, run_overrides))  # bad keys or files: fail before launching
        tokens = steps * cfg.tokens_per_step
        labels = {"width": width, "params": params, "steps": steps, "tokens": tokens}
        for seed in seeds or [None]:
            name = f"w{width}" if seed is None else f"w{width}_s{seed}"
            seeded = [] if seed is None else [f"train.seed={seed}"]
            specs.append(RunSpec(name=name, run_dir=os.path.join(out_dir, name), config=config,
                                 overrides=[*run_overrides, *seeded], max_steps=steps,
                                 labels={**labels, **({} if seed is None else {"seed": seed})}))
    return specs


def ladder_points(results: Sequence[RunResult], metric: str = "train", smooth: int = 10,
                  min_step: Optional[int] = None) -> tuple[list[LossPoint], list[str]]:
    """Loss points of the finished rungs, and a note for each rung left out (never dropped silently)."""
    points, dropped = [], []
    for result in results:
        if result.status != "done":
            dropped.append(f"{result.name}: {result.status} ({result.reason})")
            continue
        points.append(read_run_point(result.run_dir, metric, smooth=smooth, min_step=min_step))
    return points, dropped


def predict_ladder(results: Sequence[RunResult], holdout: int = 1, target: Optional[float] = None,
                   metric: str = "train", smooth: int = 10, min_step: Optional[int] = None,
                   level: float = 0.9, bootstrap: int = 0,
                   seed_offsets: bool = False) -> tuple[dict, object, list[str]]:
    """Fit L = a·params^b + c on the ladder (all but the `holdout` largest widths) and predict; (report, fit,
    dropped). `seed_offsets`: a ladder run once per seed, fitted with a per-seed offset (scaling.seeds)."""
    points, dropped = ladder_points(results, metric, smooth, min_step)
    if not points:
        raise FitError("no rung of the ladder finished: nothing to fit (" + "; ".join(dropped) + ")")
    report, fit = predict(points, "params", holdout, target, level, bootstrap, seed_offsets=seed_offsets)
    return report, fit, dropped


def format_ladder(results: Sequence[RunResult], rule: MetricRule) -> str:
    """One line per rung: name, params, steps, tokens, status and loss (or why it has none)."""
    lines = [f"{'rung':>12} {'params':>10} {'steps':>6} {'tokens':>10}  {'status':<8} {rule.metric} loss"]
    for r in results:
        value = f"{r.value:.4f}" if r.status == "done" else (r.reason.splitlines()[0][:60] if r.reason else "-")
        lines.append(f"{r.name:>12} {r.labels['params']:>10,} {r.labels['steps']:>6} "
                     f"{r.labels['tokens']:>10,}  {r.status:<8} {value}")
    return "\n".join(lines + failed_run_logs(results))
