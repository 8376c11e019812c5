"""Sweep figures: loss vs log2 of a swept value, one curve per width, and a heat map for two axes."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from megamu.scaling.launch import RunResult

LR_KEY = "train.lr"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def curve_key(results: Sequence[RunResult]) -> Optional[str]:
    """train.lr when swept, else the first swept key with positive numeric values; None if there is none."""
    keys = list(results[0].labels["hps"]) if results else []
    numeric = [k for k in keys if all(isinstance(r.labels["hps"][k], (int, float)) and r.labels["hps"][k] > 0
                                      for r in results)]
    return LR_KEY if LR_KEY in numeric else (numeric[0] if numeric else None)


def best_curves(results: Sequence[RunResult], key: str) -> dict[int, dict[float, Optional[float]]]:
    """{width: {value of key: lowest loss over the other axes, or None if every run there diverged}}."""
    curves: dict[int, dict[float, Optional[float]]] = {}
    for r in results:
        if r.status not in ("done", "diverged"):
            continue
        curve = curves.setdefault(r.labels["width"], {})
        x = float(r.labels["hps"][key])
        value = r.value if r.status == "done" else None
        old = curve.get(x)
        curve[x] = value if old is None else (old if value is None else min(old, value))
    return curves


def plot_loss_vs_value(results: Sequence[RunResult], path: str, metric: str, title: str = "") -> Optional[str]:
    """Loss vs log2(value) per width; diverged points as × at the top. Returns the path, or None."""
    key = curve_key(results)
    if key is None:
        return None
    plt = _plt()
    curves = best_curves(results, key)
    finite = [v for c in curves.values() for v in c.values() if v is not None]
    top = max(finite) + 0.05 * (max(finite) - min(finite) + 1e-9) if finite else 1.0
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(curves), 1)))
    for color, width in zip(colors, sorted(curves)):
        xs = sorted(curves[width])
        ok = [(math.log2(x), curves[width][x]) for x in xs if curves[width][x] is not None]
        if ok:
            ax.plot(*zip(*ok), "o-", color=color, label=f"width {width}")
            best_x, best_y = min(ok, key=lambda p: p[1])
            ax.plot([best_x], [best_y], "*", ms=14, color=color, markeredgecolor="k")
        bad = [math.log2(x) for x in xs if curves[width][x] is None]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=color, ms=9)
    ax.set_xlabel(f"log2({key})")
    ax.set_ylabel(f"final {metric} loss")
    ax.set_title(title or f"{metric} loss vs {key} (★ best per width, × diverged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _ordered(values: set) -> list:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return sorted(values) if numeric else sorted(values, key=str)


def plot_heatmap(results: Sequence[RunResult], width: int, path: str, metric: str) -> Optional[str]:
    """Loss over the two swept axes at `width` (grey: diverged or failed). None unless exactly two axes."""
    at_width = [r for r in results if r.labels["width"] == width]
    keys = list(at_width[0].labels["hps"]) if at_width else []
    if len(keys) != 2:
        return None
    rows, cols = (_ordered({r.labels["hps"][key] for r in at_width}) for key in keys)
    grid = np.full((len(rows), len(cols)), np.nan)
    for r in at_width:
        if r.status == "done":
            grid[rows.index(r.labels["hps"][keys[0]]), cols.index(r.labels["hps"][keys[1]])] = r.value
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 3, 0.8 * len(rows) + 2.5))
    cmap = plt.cm.viridis_r.with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            text = f"{grid[i, j]:.3f}" if np.isfinite(grid[i, j]) else "div/fail"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), [f"{c:.3g}" if isinstance(c, float) else str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [f"{r:.3g}" if isinstance(r, float) else str(r) for r in rows])
    ax.set_xlabel(keys[1])
    ax.set_ylabel(keys[0])
    ax.set_title(f"final {metric} loss at width {width}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
