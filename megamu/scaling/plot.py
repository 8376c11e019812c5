"""Plot a loss prediction: fitted and held-out points, the fitted curve, the prediction."""
from __future__ import annotations

import numpy as np

from megamu.scaling.fit import PowerLawFit


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
    ax.set_xscale("log")
    ax.set_xlabel(report["x"])
    ax.set_ylabel("loss")
    ax.set_title(f"L = a·x^b + c  ({report['level'] * 100:g}% intervals, {report['interval_method']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _error_bar(ax, x: float, y: float, interval, color: str, label) -> None:
    yerr = None if not interval else [[y - interval[0]], [interval[1] - y]]
    ax.errorbar([x], [y], yerr=yerr, fmt="D", color=color, capsize=4, zorder=4, label=label)
