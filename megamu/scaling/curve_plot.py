"""Plot a whole-curve forecast: each run's curve beside the law's, the held-out curves' errors, the target."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from megamu.scaling.curve import Curve, CurveFit
from megamu.scaling.curve_report import Target

GOAL_MEAN = 0.0025  # issue 12's goal for a held-out curve: 0.25% mean relative error after warm-up
RESERVED = ("tab:red", "tab:green", "tab:purple")  # the held-out law, the target and the early forecast


def plot_curves(fit: CurveFit, fitted: Sequence[Curve], held: Sequence[Curve], path: str,
                target: Optional[Target] = None, early: Optional[dict] = None,
                early_curve: Optional[Curve] = None) -> None:
    """Left: loss vs update, actual (solid) and law (dashed), the early run's records so far and its forecast;
    right (with held-out runs): their relative error vs update."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt
    from matplotlib.colors import same_color

    if held:
        fig, (ax, err_ax) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = [c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]
              if not any(same_color(c, r) for r in RESERVED)]
    for i, curve in enumerate([*fitted, *held]):
        color = "black" if curve in held else colors[i % len(colors)]
        label = f"{curve.name} ({curve.params:.3g})" + (" held out" if curve in held else "")
        ax.plot(curve.updates, curve.loss, color=color, lw=1.0, alpha=0.6, label=label)
        mask = curve.after_warmup()  # the law describes the curve past warm-up only
        ax.plot(curve.updates[mask], fit.predict_curve(curve)[mask], color="tab:red" if curve in held else color, lw=1.4,
                ls="--", label="law, held out (predicted)" if curve is (held[0] if held else None) else None)
    if target is not None:
        warmup = int(np.argmax(target.lrs)) + 1  # the schedule's peak ends the warm-up
        updates = np.arange(warmup, len(target.lrs) + 1)
        ax.plot(updates, fit.predict(target.params, target.lrs, updates), color="tab:green", lw=1.6,
                label=f"target {target.params:.3g} (predicted)")
    if early_curve is not None:
        ax.plot(early_curve.updates, early_curve.loss, color="tab:purple", lw=1.2, label=f"{early_curve.name} so far")
        updates = np.arange(max(early_curve.warmup_steps, 1), early_curve.final_updates + 1)
        ax.plot(updates, fit.predict(early_curve.params, early_curve.lrs, updates, early_curve.seed), color="tab:purple",
                lw=1.0, ls="--", label=f"law at {early_curve.name}'s size and schedule")
    if early:
        ax.scatter([early["final_updates"]], [early["predicted_final"]], marker="*", s=140, color="tab:purple",
                   zorder=5, label=f"early forecast from updates ≤ {early['seen_updates']}")
        ax.axvline(early["seen_updates"], color="tab:purple", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("updates")
    ax.set_ylabel("loss")
    ax.set_title("whole-curve law fitted across widths")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if held:
        _plot_errors(err_ax, fit, held)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_errors(err_ax, fit: CurveFit, held: Sequence[Curve]) -> None:  # type: ignore[no-untyped-def]
    for curve in held:
        mask = curve.after_warmup()
        rel = fit.predict_curve(curve)[mask] / curve.loss[mask] - 1.0
        err_ax.plot(curve.updates[mask], rel * 100, lw=1.0,
                    label=f"{curve.name}: mean |err| {np.mean(np.abs(rel)) * 100:.2f}%")
    for sign in (-1, 1):
        err_ax.axhline(sign * GOAL_MEAN * 100, color="gray", ls=":", lw=0.8)
    err_ax.set_xlabel("updates")
    err_ax.set_ylabel("predicted / actual − 1 (%)")
    err_ax.set_title("held-out curves after warm-up (dotted: ±0.25%)")
    err_ax.grid(True, alpha=0.3)
    err_ax.legend(fontsize=7)
