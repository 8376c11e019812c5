"""Plot a loss prediction: fitted and held-out points, the fitted curve, the prediction."""
from __future__ import annotations

import numpy as np

from megamu.scaling.fit import PowerLawFit
from megamu.scaling.seeds import holdout_by_size


def plot_prediction(report: dict, fit: PowerLawFit, path: str) -> None:
    """Write a PNG of the `predict` report; log x axis, the curve extended to the target."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    points = report["points"]
    xs = [p["x"] for p in points] + ([report["prediction"]["x"]] if report["prediction"] else [])
    curve_x = np.geomspace(min(xs) / 1.3, max(xs) * 1.3, 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(curve_x, fit.predict(curve_x), color="tab:blue",
            label=f"fit  {fit.a:.3g}·x^{fit.b:.3f} + {fit.c:.3f}")
    used = [p for p in points if p["used"]]
    seeded = "holdout_mean" in report  # seed offsets: the curve is the seed-averaged law
    ax.scatter([p["x"] for p in used], [p["loss"] for p in used], color="tab:blue", zorder=3,
               alpha=0.35 if seeded else 1.0, label="fitted runs" if seeded else "fitted")
    if seeded:
        sizes = sorted({p["x"] for p in used})
        means = [np.mean([p["loss"] for p in used if p["x"] == x]) for x in sizes]
        ax.scatter(sizes, means, marker="s", color="tab:blue", zorder=4, label="seed mean (fitted)")
        ax.scatter([h["x"] for h in report["holdout"]], [h["actual"] for h in report["holdout"]], marker="x",
                   color="tab:red", alpha=0.35, zorder=5, label="held-out runs")
    scored = report["holdout_mean"] if seeded else report["holdout"]
    for i, h in enumerate(scored):
        ax.scatter(h["x"], h["actual"], marker="x", s=70, color="tab:red", zorder=5,
                   label=("held out, seed mean (actual)" if seeded else "held out (actual)") if i == 0 else None)
        _error_bar(ax, h["x"], h["predicted"], h["interval"], "tab:orange", "held out (predicted)" if i == 0 else None)
    if report["prediction"]:
        pred = report["prediction"]
        _error_bar(ax, pred["x"], pred["loss"], pred["interval"], "tab:green",
                   f"prediction at {pred['x']:.3g}: {pred['loss']:.4f}")
    source = report.get("interval_source") or "none"  # where the intervals drawn came from (the selection's, ...)
    _finish(fig, ax, report["x"], f"L = a·x^b + c  ({report['level'] * 100:g}% intervals: {source})", path)


def _finish(fig, ax, xlabel: str, title: str, path: str, title_size: object = "large") -> None:
    """Log x axis, labels, grid and legend; write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=title_size)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _error_bar(ax, x: float, y: float, interval, color: str, label) -> None:
    yerr = None if not interval else [[y - interval[0]], [interval[1] - y]]
    ax.errorbar([x], [y], yerr=yerr, fmt="D", color=color, capsize=4, zorder=4, label=label)


def selection_curve(selection: dict, x: np.ndarray) -> np.ndarray:
    """The cross-validated law of a `predict` report's selection block, E + A·x^(−α), at x."""
    law = selection["fit"]
    return (law["E"] or 0.0) + law["A_x"] * np.asarray(x, dtype=float) ** -law["alpha_x"]


def plot_forecast(report: dict, path: str) -> None:
    """Write a PNG of the cross-validated forecast (`report["selection"]`): the fitted rungs, the chosen law
    extended to the target, each held-out rung (actual, and predicted with its interval) and the target with
    its interval, each interval labelled with its half-width as a share of the prediction."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    selection = report["selection"]
    offsets = {int(s): d for s, d in report.get("seed_offsets", {}).items()}
    used = [p for p in report["points"] if p["used"]]
    target = selection["prediction"]
    xs = [p["x"] for p in report["points"]] + ([target["x"]] if target else [])
    curve_x = np.geomspace(min(xs) / 1.3, max(xs) * 1.3, 200)
    pct = f"{report['level'] * 100:g}%"
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    fitted_max = max(p["x"] for p in used)
    inside = curve_x <= fitted_max
    ax.plot(curve_x[inside], selection_curve(selection, curve_x[inside]), color="tab:blue",
            label=f"fit: {selection['chosen']} (chosen by cross-validation)")
    ax.plot(curve_x[~inside], selection_curve(selection, curve_x[~inside]), "--", color="tab:blue",
            label="forecast (extrapolated)")
    # With seed offsets the law is the seed-averaged one: each run is drawn less its seed's offset.
    ax.scatter([p["x"] for p in used], [p["loss"] - offsets.get(p.get("seed"), 0.0) for p in used],
               color="tab:blue", zorder=3, label="ladder (fitted)" + (", seed offsets removed" if offsets else ""))
    for i, h in enumerate(selection["holdout"]):
        ax.scatter(h["x"], h["actual"], marker="x", s=80, color="tab:red", zorder=5,
                   label="held-out rung (actual)" if i == 0 else None)
    for i, h in enumerate(holdout_by_size(selection["holdout"])):  # scored by the mean of the rung's seeds
        mean = f" vs the mean of {h['runs']} seeds" if h["runs"] > 1 else ""
        _interval_bar(ax, h["x"], h["predicted"], h["interval"], "tab:orange",
                      f"held-out rung predicted: {h['predicted']:.3f} ({h['rel_error'] * 100:+.2f}%{mean}), {pct} "
                      f"{_bounds(h['interval'])}" if i == 0 else None)
    if target:
        _interval_bar(ax, target["x"], target["predicted"], target["interval"], "tab:green",
                      f"target, {target['x']:.3g} {report['x']}: {target['predicted']:.3f}, {pct} "
                      f"{_bounds(target['interval'])}")
    _finish(fig, ax, report["x"], f"Loss forecast: fit the ladder, predict the held-out rung and the target "
            f"({pct} intervals)", path, title_size=10)


def _interval_bar(ax, x: float, y: float, interval, color: str, label) -> None:
    """A predicted point with its interval, annotated with the interval's half-width in % of the prediction."""
    _error_bar(ax, x, y, interval, color, label)
    if interval:
        ax.annotate(f"±{(interval[1] - interval[0]) / 2 / y * 100:.1f}%", (x, interval[1]), xytext=(4, 2),
                    textcoords="offset points", fontsize=8, color=color)


def _bounds(interval) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "(no interval)"
