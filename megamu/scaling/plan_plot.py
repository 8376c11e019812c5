"""The planner's picture: IsoFLOP curves (loss against N at fixed compute) with the optimum of each marked,
the planned budget's curve bold with its interval band where the law has one, and the written config."""
from __future__ import annotations

import numpy as np

from megamu.scaling.nd_law import NDLaw
from megamu.scaling.planner import isoflop_curve, optimal_params
from megamu.scaling.sweep_plot import _plt

BUDGET_FACTORS = (0.1, 1.0, 10.0)  # the planned budget and one decade either side, for context


def plot_plan(report: dict, law: NDLaw, path: str) -> None:
    plt = _plt()
    flops, level = report["budget_flops"], report["level"]
    centre = report["optimum"]["params"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for factor in BUDGET_FACTORS:
        budget = flops * factor
        n_opt = optimal_params(law, budget)
        grid = np.geomspace(centre / 40, min(centre * 40, budget / 6.0), 200)
        main = factor == 1.0
        line, = ax.plot(grid, isoflop_curve(law, budget, grid), lw=2.2 if main else 1.0, alpha=1.0 if main else 0.5,
                        label=f"C = {budget:.3g} FLOPs")
        ax.scatter([n_opt], isoflop_curve(law, budget, np.array([n_opt])), marker="*", s=140 if main else 60,
                   color=line.get_color(), zorder=4)
        if main and law.covariance is not None:
            band = law.interval(grid, budget / (6.0 * grid), level)
            ax.fill_between(grid, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.15,
                            label=f"{level * 100:g}% interval (delta method)")
    opt = report["optimum"]
    ax.annotate(f"optimum N = {opt['params']:.3g}, D = {opt['tokens']:.3g}\nloss {opt['loss']:.4f}",
                (opt["params"], opt["loss"]), textcoords="offset points", xytext=(10, 18), fontsize=8)
    if report["constraint"] != "compute-optimal":
        planned = report["plan"]
        ax.scatter([planned["params"]], [planned["loss"]], marker="o", s=60, color="tab:red", zorder=5,
                   label=report["constraint"])
    training = report["training"]
    ax.scatter([training["params"]], [training["loss"]], marker="x", s=70, color="black", zorder=6,
               label=f"written config: N = {training['params']:.3g}, D = {training['tokens']:.3g}")
    ax.set_xscale("log")
    ax.set_xlim(centre / 40, centre * 40)
    ax.set_xlabel("parameters N (D = C / 6N)")
    ax.set_ylabel("predicted loss")
    ax.set_title(f"IsoFLOP curves of {report['law']['form']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
