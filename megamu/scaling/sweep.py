"""μP hyper-parameter sweep: grid or random search over any dotted config keys, at one or more widths.

Typical axes: η (train.lr), σ (mup.init_std), α_out (mup.output_mult), α_attn (mup.attn_mult),
train.warmup_steps. Each point is one run directory under the sweep directory, named from its
width and hyper-parameters (e.g. w64__lr-0.003__output_mult-4); runs are launched and resumed by
megamu.scaling.launch. The result is a table, sweep.json, and best.yaml: the best point's
hyper-parameters as a config overlay (a partial YAML config in the usual sections).

With several widths, best.yaml holds the best point at the selection width: the config's
mup.base_hidden_size when it is swept (the μP proxy width, whose optimum transfers), else the
smallest width. sweep.json also has the best point of every width.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import yaml

from megamu.config import Config, ConfigError, load_config
from megamu.fileio import atomic_write
from megamu.scaling.launch import DEFAULT_TRAINER, MetricRule, RunResult, RunSpec, failed_run_logs, run_all
from megamu.scaling.sweep_plot import plot_heatmap, plot_loss_vs_value
from megamu.scaling.widths import width_overrides

SWEEP_JSON = "sweep.json"
SWEEP_PLOT = "sweep.png"
HEATMAP_PLOT = "heatmap.png"
BEST_YAML = "best.yaml"
WIDTH_KEYS = ("model.hidden_size", "model.n_heads", "model.n_kv_heads")


@dataclass(frozen=True)
class Axis:
    """One swept key: explicit values (grid, or uniform choice when random) or a log-uniform range."""

    key: str
    values: tuple = ()
    low: Optional[float] = None
    high: Optional[float] = None

    @property
    def is_range(self) -> bool:
        return self.low is not None


def parse_axis(spec: str, allow_range: bool) -> Axis:
    """`key=v1,v2,...` or (random search only) `key=LOW:HIGH`."""
    if "=" not in spec:
        raise ConfigError(f"sweep axis '{spec}' must look like section.key=v1,v2 (e.g. train.lr=1e-3,3e-3)")
    key, text = (s.strip() for s in spec.split("=", 1))
    if key in WIDTH_KEYS:
        raise ConfigError(f"sweep axis '{key}': sweep widths with --widths, which also scales the heads")
    if ":" in text:
        if not allow_range:
            raise ConfigError(f"sweep axis '{spec}': a LOW:HIGH range needs --random N; list values for a grid")
        try:
            low, high = (float(v) for v in text.split(":"))
        except ValueError:
            raise ConfigError(f"sweep axis '{spec}': the range must be two numbers LOW:HIGH") from None
        if not 0 < low < high:
            raise ConfigError(f"sweep axis '{spec}': log-uniform sampling needs 0 < LOW < HIGH")
        return Axis(key, low=low, high=high)
    try:
        values = tuple(parse_value(v) for v in text.split(",") if v.strip())
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep axis '{spec}': a value is neither a number nor a YAML scalar ({err}); quote "
                          f"or fix it") from None
    if not values:
        raise ConfigError(f"sweep axis '{spec}' has no values")
    if len(set(map(str, values))) != len(values):
        raise ConfigError(f"sweep axis '{spec}' repeats a value")
    return Axis(key, values=values)


def parse_value(text: str) -> Any:
    """A number when it reads as one (YAML would keep 1e-3 a string), else YAML (true, null, words)."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def sort_key(value: Any) -> tuple:
    """Numbers in numeric order, then everything else by its text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def check_axes(axes: Sequence[Axis], config: Optional[str], overrides: Sequence[str]) -> None:
    """Every key must exist and every listed value must have the key's type (raises ConfigError)."""
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"a key is swept twice: {keys}")
    for axis in axes:
        for value in axis.values or (axis.low, axis.high):
            load_config(config, [*overrides, f"{axis.key}={value}"])


def _is_int_key(key: str) -> bool:
    section, name = key.split(".")
    return isinstance(getattr(getattr(Config(), section), name), int) and not isinstance(
        getattr(getattr(Config(), section), name), bool)


def grid_points(axes: Sequence[Axis]) -> list[dict]:
    return [dict(zip((a.key for a in axes), combo)) for combo in itertools.product(*(a.values for a in axes))]


def random_points(axes: Sequence[Axis], count: int, seed: int = 0) -> list[dict]:
    """`count` points: ranges log-uniform (integers rounded, floats to 3 significant digits), lists uniform."""
    if count < 1:
        raise ConfigError(f"--random must be at least 1, got {count}")
    rng = random.Random(seed)
    points: list[dict] = []
    for _ in range(count):
        point = {}
        for axis in axes:
            if axis.is_range:
                value = math.exp(rng.uniform(math.log(axis.low), math.log(axis.high)))
                point[axis.key] = round(value) if _is_int_key(axis.key) else float(f"{value:.3g}")
            else:
                point[axis.key] = rng.choice(axis.values)
        if point not in points:  # rounding can repeat a point; it would share a run directory
            points.append(point)
    return points


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_name(hps: dict, width: Optional[int]) -> str:
    """Directory name from the width and hyper-parameters: w64__lr-0.003__output_mult-4."""
    short = [k.split(".")[1] for k in hps]
    parts = [f"w{width}"] if width is not None else []
    for key, value in hps.items():
        label = key.split(".")[1] if short.count(key.split(".")[1]) == 1 else key.replace(".", "_")
        parts.append(f"{label}-{format_value(value)}")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "__".join(parts) or "base")


@dataclass
class SweepPlan:
    config: Optional[str]
    overrides: list[str]  # applied to every run
    points: list[dict]  # hyper-parameters of each point
    widths: list[Optional[int]]  # [None]: the config's own width
    out_dir: str

    def specs(self) -> list[RunSpec]:
        """One run spec per (width, point), validated (keys, types, data files) before any launch."""
        base = load_config(self.config, self.overrides)
        specs = []
        for width in self.widths:
            scaled = width_overrides(base, width) if width is not None else []
            for hps in self.points:
                overrides = [*self.overrides, *scaled, *(f"{k}={v}" for k, v in hps.items())]
                cfg = load_config(self.config, overrides).validate()
                name = run_name(hps, width)
                specs.append(RunSpec(name=name, run_dir=os.path.join(self.out_dir, name), config=self.config,
                                     overrides=overrides, max_steps=cfg.train.max_steps,
                                     labels={"width": cfg.model.hidden_size, "hps": hps}))
        return specs

    def selection_width(self) -> int:
        base = load_config(self.config, self.overrides)
        widths = [w for w in self.widths if w is not None] or [base.model.hidden_size]
        return base.mup.base_hidden_size if base.mup.base_hidden_size in widths else min(widths)


def best_result(results: Sequence[RunResult], width: Optional[int] = None) -> Optional[RunResult]:
    """The finished run with the lowest metric (at `width` if given); None when none finished."""
    done = [r for r in results if r.status == "done" and (width is None or r.labels["width"] == width)]
    return min(done, key=lambda r: r.value) if done else None


def overlay_dict(hps: dict) -> dict:
    """{'train.lr': 3e-3} -> {'train': {'lr': 3e-3}}: the YAML config layout."""
    nested: dict = {}
    for key, value in hps.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    return nested


def write_overlay(hps: dict, path: str, source: str) -> None:
    with atomic_write(path) as handle:
        handle.write(f"# Best hyper-parameters of the sweep in {source}; a config overlay: pass its keys as\n"
                     f"# overrides (megamu-scale --overlay {os.path.basename(path)}) or load it with load_config.\n")
        yaml.safe_dump(overlay_dict(hps), handle, sort_keys=False)


def overlay_overrides(path: str) -> list[str]:
    """A config overlay (best.yaml) as section.key=value overrides, checked against the config schema."""
    load_config(path)  # unknown sections, keys or bad values: a ConfigError naming the file
    with open(path) as handle:
        raw = yaml.safe_load(handle) or {}
    return [f"{section}.{key}={value!r}" if isinstance(value, str) else f"{section}.{key}={value}"
            for section, values in raw.items() for key, value in values.items()]


def summarize(plan: SweepPlan, results: Sequence[RunResult], rule: MetricRule) -> dict:
    """The sweep.json content: every run, the best point overall and per width."""
    widths = sorted({r.labels["width"] for r in results})
    select = plan.selection_width()
    best = best_result(results, select)
    return {
        "config": plan.config,
        "overrides": plan.overrides,
        "metric": rule.metric,
        "smooth": rule.smooth,
        "diverge_above": rule.diverge_above,
        "selection_width": select,
        "runs": [r.to_dict() for r in results],
        "best": None if best is None else {"name": best.name, "width": best.labels["width"],
                                           "hps": best.labels["hps"], "value": best.value},
        "best_per_width": {str(w): {"name": b.name, "hps": b.labels["hps"], "value": b.value}
                           for w in widths if (b := best_result(results, w)) is not None},
    }


def write_outputs(plan: SweepPlan, results: Sequence[RunResult], rule: MetricRule) -> dict:
    """sweep.json and (when some run finished) best.yaml in the sweep directory; returns the summary."""
    summary = summarize(plan, results, rule)
    with atomic_write(os.path.join(plan.out_dir, SWEEP_JSON)) as handle:
        json.dump(summary, handle, indent=1)
    if summary["best"] is not None:
        write_overlay(summary["best"]["hps"], os.path.join(plan.out_dir, BEST_YAML), plan.out_dir)
    return summary


def format_table(results: Sequence[RunResult], rule: MetricRule) -> str:
    keys = list(results[0].labels["hps"]) if results else []
    header = ["width", *(k.split(".")[1] for k in keys), "status", f"{rule.metric} loss"]
    rows = []
    for r in sorted(results, key=lambda r: (r.labels["width"], *(sort_key(r.labels["hps"][k]) for k in keys))):
        value = f"{r.value:.4f}" if r.status == "done" else r.reason.splitlines()[0][:60] if r.reason else "-"
        rows.append([str(r.labels["width"]), *(format_value(r.labels["hps"][k]) for k in keys), r.status, value])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines + failed_run_logs(results))


def format_best(summary: dict) -> str:
    best = summary["best"]
    if best is None:
        return f"no run finished at the selection width {summary['selection_width']}: no best point"
    hps = ", ".join(f"{k}={format_value(v)}" for k, v in best["hps"].items())
    return f"best at width {best['width']}: {hps} ({summary['metric']} loss {best['value']:.4f}) -> {BEST_YAML}"


def run_sweep(plan: SweepPlan, rule: MetricRule, parallel: int = 1, trainer: Sequence[str] = DEFAULT_TRAINER,
              echo: bool = True) -> tuple[list[RunResult], dict]:
    """Validate, launch what is not finished, then write sweep.json, best.yaml and the figures."""
    specs = plan.specs()
    os.makedirs(plan.out_dir, exist_ok=True)
    results = run_all(specs, rule, parallel, trainer, echo=echo)
    summary = write_outputs(plan, results, rule)
    plot_loss_vs_value(results, os.path.join(plan.out_dir, SWEEP_PLOT), rule.metric)
    plot_heatmap(results, plan.selection_width(), os.path.join(plan.out_dir, HEATMAP_PLOT), rule.metric)
    return results, summary
