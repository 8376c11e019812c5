"""Whole-curve forecast across widths and under an unseen schedule, and the early forecast, on real megamu runs.

    python benchmarks/bench_curve.py [--out runs/bench/curve_clean] [--fit-widths 16,32,48,64] [--target-width 256]
        [--fit-schedules cosine] [--steps 600] [--batch 32] [--eval-every 20] [--spread-seeds 2] [--parallel 1]
        [--metric val|train] [--smooth 21] [--figures DIR] [--quick]

Model and corpus of bench_mutransfer.py (the shipped mup_proxy, 1024-piece tokenizer) at the config's η,
transferred unchanged under μP, with the run settings of `make demo` (megamu/demo.py's DEMO_OVERRIDES: readout
initialised normally, MLP 8/3 of every width, 50 warm-up steps, η annealed to 0, every step logged); steps,
batch and evaluation are this benchmark's. The fitted rungs train with the cosine schedule (`--fit-schedules
cosine,constant`: each fitted width also at a constant η, which separates the annealing term); the held-out rung
(≥ 8× the params of the largest fitted one) trains with WSD, a schedule the fit never saw. The curve law
(megamu/scaling/curve.py) is fitted to the fitted rungs' validation curves (8 fixed batches every
`--eval-every` steps, as `megamu-curve --metric auto` does when every run logged them) and scored on the
held-out rung's whole curve after warm-up: mean and max relative error. `--metric train` uses the train losses
instead (every step, a centred mean of `--smooth` records; every run of one seed sees the same batches at each
step, so the batch noise is shared across widths). The early forecast
predicts the held-out rung's final loss from its first 20% (`--early-fraction`); `--spread-seeds` trains the
smallest fitted width again with those seeds, which gives the seed-to-seed spread the forecast's flag is
measured against. Runs go one at a time (the CPU is shared); finished runs are kept and reused when the
benchmark runs again. `--quick` is the smoke size of `make bench`. BENCHMARKS.md has the results.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional

# Run as a script, so this directory is on sys.path.
from bench_mutransfer import FIGURES, PROXY_CONFIG, bench_data

from megamu.demo import DEMO_OVERRIDES
from megamu.scaling.curve import read_curve
from megamu.scaling.curve_plot import plot_curves
from megamu.scaling.curve_report import curve_report, format_curve_report
from megamu.scaling.ladder import TokenBudget, plan_ladder
from megamu.scaling.launch import MetricRule, run_all
from megamu.scaling.runs import read_metrics

RULE = MetricRule(metric="val")
QUICK = {"fit_widths": "16,32,48", "target_width": 64, "steps": 40, "batch": 4, "eval_every": 4, "spread_seeds": "",
         "early_fraction": 0.5, "smooth": 5, "warmup": 5}


def train(args: argparse.Namespace) -> tuple:
    """(fitted run dirs, held-out run dir); runs finished earlier are reused."""
    # The demo's settings first: the benchmark's own batch, evaluation and warm-up (and the budget's steps) win.
    common = [*bench_data(), *DEMO_OVERRIDES, f"train.global_batch_size={args.batch}",
              f"train.micro_batch_size={args.batch}", f"train.eval_interval={args.eval_every}", "train.eval_iters=8",
              *([f"train.warmup_steps={args.warmup}"] if args.warmup is not None else [])]
    budget = TokenBudget(steps=args.steps)
    fitted = [dataclasses.replace(spec, name=f"{schedule}/{spec.name}") for schedule in args.fit_schedules
              for spec in plan_ladder(PROXY_CONFIG, [*common, f"train.schedule={schedule}"], args.fit_widths, budget,
                                      os.path.join(args.out, schedule))]
    if args.spread_seeds:
        first = args.fit_schedules[0]
        fitted += plan_ladder(PROXY_CONFIG, [*common, f"train.schedule={first}"], [min(args.fit_widths)], budget,
                              os.path.join(args.out, f"{first}_seeds"), args.spread_seeds)
    held = plan_ladder(PROXY_CONFIG, [*common, "train.schedule=wsd"], [args.target_width], budget,
                       os.path.join(args.out, "wsd"))
    results = run_all([*fitted, *held], RULE, args.parallel)
    failed = [f"{r.name}: {r.status} ({r.reason})" for r in results if r.status != "done"]
    if failed:
        raise SystemExit("runs did not finish: " + "; ".join(failed))
    return [s.run_dir for s in fitted], held[0].run_dir


def training_seconds(run_dirs: list) -> float:
    """Wall time the runs spent training, from their own last train record (so reused runs count too)."""
    return sum(float(read_metrics(d)[1][-1].get("time_s") or 0.0) for d in run_dirs)


def table(report: dict, args: argparse.Namespace, wall_s: float) -> list[str]:
    (held,) = report["holdout"]
    early = report["early"]
    early_error = early["predicted_final"] / held["final"]["actual"] - 1
    spread = "unknown" if report["seed_spread"] is None else f"{report['seed_spread'] * 100:.2f}%"
    return [
        f"| fitted ({', '.join(args.fit_schedules)}) | held out (WSD) | × params | records | mean rel. error | max rel. error | "
        f"final actual / predicted | early forecast from {args.early_fraction:.0%} (error) | seed σ | flagged |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {', '.join(f'w{w}' for w in args.fit_widths)} | w{args.target_width} | {held['size_ratio']:.1f}× | "
        f"{held['records']} | {held['mean_rel_error'] * 100:.3f}% | {held['max_rel_error'] * 100:.3f}% | "
        f"{held['final']['actual']:.4f} / {held['final']['predicted']:.4f} | {early['predicted_final']:.4f} "
        f"({early_error * 100:+.2f}%) | {spread} | {early['flagged']} |",
        "",
        f"{args.steps} steps × {args.batch * 64} tokens; "
        + (f"val loss every {args.eval_every} steps (8 batches)" if args.metric == "val" else
           f"train loss of every step, centred mean of {args.smooth}") + "; "
        f"law fit rms {report['rms_rel'] * 100:.3f}%"
        + (f", not pinned (on a bound): {', '.join(report['fit']['at_bounds'])}" if report["fit"]["at_bounds"] else "")
        + f"; training wall time of the runs {wall_s / 60:.1f} min on a 2-core CPU (shared).",
    ]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/curve_clean", help="runs go to OUT/<steps>x<batch>/")
    parser.add_argument("--fit-widths", default="16,32,48,64")
    parser.add_argument("--target-width", type=int, default=256)
    parser.add_argument("--fit-schedules", default="cosine",
                        help="schedules the fitted widths train with, each one run per width (cosine, constant)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32, help="global (= micro) batch in sequences of 64 tokens")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=None, help="train.warmup_steps (default: the demo's)")
    parser.add_argument("--metric", choices=("train", "val"), default="val", help="the curves fitted and scored")
    parser.add_argument("--smooth", type=int, default=21, help="train curves: centred mean of W records")
    parser.add_argument("--spread-seeds", default="2", help="extra train.seed values for the smallest width")
    parser.add_argument("--early-fraction", type=float, default=0.2)
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (the CPU is shared: 1)")
    parser.add_argument("--figures", default=FIGURES, help="where the PNG goes (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke size: seconds of training, no figures kept")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.out = os.path.join(args.out, "quick")
    else:  # another budget is another ladder: its runs must not meet the finished runs of this one
        args.out = os.path.join(args.out, f"{args.steps}x{args.batch}")
    args.fit_widths = [int(w) for w in args.fit_widths.split(",")]
    args.fit_schedules = [s.strip() for s in args.fit_schedules.split(",") if s.strip()]
    if not args.fit_schedules or not set(args.fit_schedules) <= {"cosine", "constant"}:
        parser.error(f"--fit-schedules takes cosine and/or constant (the held-out rung's WSD must stay unseen), "
                     f"got {args.fit_schedules}")
    args.spread_seeds = [int(s) for s in str(args.spread_seeds).split(",") if s.strip()]
    fitted_dirs, held_dir = train(args)
    wall_s = training_seconds([*fitted_dirs, held_dir])
    curves = [read_curve(d, args.metric, args.smooth) for d in [*fitted_dirs, held_dir]]
    early = curves[-1].prefix(args.early_fraction)
    report, fit, held = curve_report(curves, holdout=1, early=early)
    print(format_curve_report(report))
    figures = os.path.join(args.out, "figures") if args.quick else args.figures
    os.makedirs(figures, exist_ok=True)
    plot_curves(fit, [c for c in curves if c not in held], held, os.path.join(figures, f"curve_{args.steps}steps.png"),
                early=report["early"])
    lines = table(report, args, wall_s)
    print("\n" + "\n".join(lines))
    with open(os.path.join(args.out, "report.json"), "w") as handle:
        json.dump({**report, "wall_s": wall_s}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
