"""Fit one schedule-aware law to the whole loss curves of a ladder; predict other sizes' curves and a run's end early.

    megamu-curve RUN_DIR... [--metric auto|train|val] [--smooth W] [--holdout K]
        [--target CONFIG.yaml [--target-params N]] [--early RUN_DIR [--fraction F]] [--json OUT] [--plot OUT.png]

Each run's learning rate at every update comes from its config.yaml (megamu's schedules: warm-up, cosine,
WSD, constant). --holdout K scores the K largest sizes' whole curves; --early forecasts the final loss of a
run from its records so far (or its first F of the schedule) and flags it when it has left the ladder's trend.
--metric auto (the default) fits validation curves when every run logged them, else train curves, and says which.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from megamu.cli import ArgumentParser, check_outputs, console_script
from megamu.scaling.curve import choose_metric, read_curve
from megamu.scaling.curve_plot import plot_curves
from megamu.scaling.curve_report import curve_report, format_curve_report, read_target
from megamu.scaling.runs import distinct_runs


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (metrics.jsonl, config.yaml)")
    parser.add_argument("--metric", choices=("auto", "train", "val"), default="auto",
                        help="eval val_loss or train loss; auto: val when every run logged it, else train")
    parser.add_argument("--smooth", type=int, default=1, help="train losses: centred mean of W records (default 1)")
    parser.add_argument("--holdout", type=int, default=0, help="hold out the K largest sizes and score their curves")
    parser.add_argument("--target", metavar="CONFIG.yaml", help="predict the whole curve of this config's run")
    parser.add_argument("--target-params", type=float, help="the target's parameter count (default: counted)")
    parser.add_argument("--early", metavar="RUN_DIR", help="forecast this (partial) run's final loss")
    parser.add_argument("--fraction", type=float, help="--early: use only the first F of its schedule (0 < F ≤ 1)")
    parser.add_argument("--json", metavar="OUT", help="write the report as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="plot actual and predicted curves")
    return parser


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(args, "json", "plot")
    if args.fraction is not None and not (args.early and 0 < args.fraction <= 1):
        parser.error("--fraction F needs --early RUN_DIR and 0 < F <= 1")
    if args.target_params is not None and not args.target:
        parser.error("--target-params needs --target CONFIG.yaml")
    distinct_runs(args.run_dirs)
    metric, why = (args.metric, "as asked") if args.metric != "auto" else \
        choose_metric([*args.run_dirs, *([args.early] if args.early else [])])
    curves = [read_curve(d, metric, args.smooth) for d in args.run_dirs]
    early = None
    if args.early:
        early = read_curve(args.early, metric, args.smooth)
        early = early.prefix(args.fraction) if args.fraction else early
    target = read_target(args.target, args.target_params, curves) if args.target else None
    for note in target.notes if target else ():
        print(f"note: {args.target}: {note}")
    report, fit, held = curve_report(curves, args.holdout, early, target)
    report = {"metric": metric, "metric_reason": why, **report}
    print(format_curve_report(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.plot:
        fitted = [c for c in curves if c not in held]
        plot_curves(fit, fitted, held, args.plot, target, report["early"], early)
    return 0
