"""Whole-curve forecast across widths and under an unseen schedule, and the early forecast, on real megamu runs.

    python benchmarks/bench_curve.py [--out runs/bench/curve] [--fit-widths 16,32,48] [--target-width 192]
        [--steps 1000] [--batch 16] [--eval-every 20] [--ffn-multiple 8] [--spread-seeds 2,3] [--parallel 1]
        [--metric train|val] [--smooth 21] [--figures DIR] [--quick]

Model and corpus of bench_mutransfer.py (the shipped mup_proxy, 1024-piece tokenizer) at the config's η,
transferred unchanged under μP. The fitted rungs train with the cosine schedule; the held-out rung (≥ 8× the
params of the largest fitted one) trains with WSD, a schedule the fit never saw. The fitted rungs round their
FFN width (8/3 of the width) up to a multiple of 8, not the config's 64, under which w32 and w48 both get 128
and the ladder's two larger rungs differ only in attention (w192's 512 is exact under either; `--ffn-multiple 0`
keeps the config's). The curve law (megamu/scaling/curve.py) is fitted to the fitted rungs' train-loss curves
(every step, a centred mean of `--smooth` records; every run of one seed sees the same batches at each step,
so the batch noise is shared across widths) and scored on the held-out rung's whole curve after warm-up: mean
and max relative error. `--metric val` uses the eval records instead (8 batches every `--eval-every` steps);
runs trained before the validation batches stopped depending on train.seed are scored on other text than
later ones, so val curves from both cannot be mixed, while their train curves can. The early forecast
predicts the held-out rung's final loss from its first 20% (`--early-fraction`); `--spread-seeds` trains the
smallest fitted width again with those seeds, which gives the seed-to-seed spread the forecast's flag is
measured against. Runs go one at a time (the CPU is shared); finished runs are kept and reused when the
benchmark runs again. `--quick` is the smoke size of `make bench`. BENCHMARKS.md has the results and why the
issue's goal is far off at this scale.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

# Run as a script, so this directory is on sys.path.
from bench_mutransfer import FIGURES, PROXY_CONFIG, bench_data

from megamu.scaling.curve import read_curve
from megamu.scaling.curve_plot import plot_curves
from megamu.scaling.curve_report import curve_report, format_curve_report
from megamu.scaling.ladder import TokenBudget, plan_ladder
from megamu.scaling.launch import MetricRule, run_all
from megamu.scaling.runs import read_metrics

RULE = MetricRule(metric="val")
QUICK = {"fit_widths": "16,32,48", "target_width": 64, "steps": 40, "batch": 4, "eval_every": 4, "spread_seeds": "",
         "early_fraction": 0.5, "smooth": 5}


def train(args: argparse.Namespace) -> tuple:
    """(fitted run dirs, held-out run dir); runs finished earlier are reused."""
    common = [*bench_data(), f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
              f"train.eval_interval={args.eval_every}", "train.eval_iters=8", "log.interval=1"]
    budget = TokenBudget(steps=args.steps)
    ffn, suffix = [], ""
    if args.ffn_multiple:  # its own directories: the runs of the config's FFN widths stay reusable
        ffn, suffix = [f"model.ffn_multiple_of={args.ffn_multiple}"], f"_ffn{args.ffn_multiple}"
    cosine = [*common, "train.schedule=cosine", *ffn]
    fitted = plan_ladder(PROXY_CONFIG, cosine, args.fit_widths, budget, os.path.join(args.out, "cosine" + suffix))
    if args.spread_seeds:
        fitted += plan_ladder(PROXY_CONFIG, cosine, [min(args.fit_widths)], budget,
                              os.path.join(args.out, "cosine_seeds" + suffix), args.spread_seeds)
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
        "| fitted (cosine) | held out (WSD) | × params | records | mean rel. error | max rel. error | "
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
        f"fitted rungs' model.ffn_multiple_of {args.ffn_multiple or 'of the config'}; "
        f"law fit rms {report['rms_rel'] * 100:.3f}%"
        + (f", not pinned (on a bound): {', '.join(report['fit']['at_bounds'])}" if report["fit"]["at_bounds"] else "")
        + f"; training wall time of the runs {wall_s / 60:.1f} min on a 2-core CPU (shared).",
    ]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/curve", help="runs go to OUT/<steps>x<batch>/")
    parser.add_argument("--fit-widths", default="16,32,48")
    parser.add_argument("--target-width", type=int, default=192)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16, help="global (= micro) batch in sequences of 64 tokens")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--ffn-multiple", type=int, default=8,
                        help="fitted rungs' model.ffn_multiple_of (0: the config's 64, under which w32 and w48 "
                        "share one FFN width)")
    parser.add_argument("--metric", choices=("train", "val"), default="train", help="the curves fitted and scored")
    parser.add_argument("--smooth", type=int, default=21, help="train curves: centred mean of W records")
    parser.add_argument("--spread-seeds", default="2,3", help="extra train.seed values for the smallest width")
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
