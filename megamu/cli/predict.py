"""Fit L = a·x^b + c to run directories or a CSV of points and predict the loss at a larger x.

    megamu-predict RUN_DIR... | --points FILE.csv [--x params|tokens|flops]
        [--metric train|val] [--at-step S | --at-tokens T] [--smooth W] [--min-step S]
        [--holdout K] [--seed-offsets] [--target X] [--level P] [--bootstrap N] [--two-var --target-tokens D]
        [--json OUT] [--plot OUT.png]
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from megamu.cli import ArgumentParser, check_outputs, console_script
from megamu.scaling.plot import plot_prediction
from megamu.scaling.points import X_KINDS, read_points_csv
from megamu.scaling.predict import format_report, predict
from megamu.scaling.runs import distinct_runs, read_run_point


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run directories with metrics.jsonl")
    parser.add_argument("--points", metavar="FILE.csv", help="CSV with loss and params/params_m/tokens/flops")
    parser.add_argument("--x", choices=X_KINDS, default="params", help="what the loss is a power law of")
    parser.add_argument("--metric", choices=("train", "val"), default="train", help="train loss or eval val_loss")
    at = parser.add_mutually_exclusive_group()
    at.add_argument("--at-step", type=int, help="read each run at this step (default: its final record)")
    at.add_argument("--at-tokens", type=float, help="read each run at this token count")
    parser.add_argument("--smooth", type=int, default=10, help="mean of the last W train records (default 10)")
    parser.add_argument("--min-step", type=int, default=None,
                        help="ignore records before this step (default min(5000, half the run): past the transient)")
    parser.add_argument("--holdout", type=int, default=0, help="fit all but the K largest x (all runs at each) and score those")
    parser.add_argument("--seed-offsets", action="store_true",
                        help="runs repeated per seed at every size: fit a per-seed offset (train.seed of each run, "
                             "or a CSV `seed` column) and score each held-out size's seed mean")
    parser.add_argument("--target", type=float, help="predict the loss at this x")
    parser.add_argument("--level", type=float, default=0.9, help="nominal interval coverage (default 0.9)")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="residual-bootstrap intervals with N resamples (default: delta method)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--two-var", action="store_true", help="also fit L(N, D) = E + A/N^alpha + B/D^beta")
    parser.add_argument("--target-tokens", type=float, help="token count D at --target for --two-var")
    parser.add_argument("--json", metavar="OUT", help="write the result as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="write a plot of points, fit and prediction")
    return parser


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(args, "json", "plot")
    if bool(args.run_dirs) == bool(args.points):
        parser.error("give run directories or --points FILE.csv (exactly one of them)")
    ignored = _run_dir_options(parser, args) if args.points else []
    if ignored:
        parser.error(f"{', '.join(ignored)} read run directories; with --points the CSV's loss is used as it is: "
                     f"drop {' and '.join(ignored)}")
    if args.target_tokens is not None and not args.two_var:
        parser.error("--target-tokens is the token count for --two-var's L(N, D): add --two-var or drop it")
    if args.points:
        points = read_points_csv(args.points, args.x)
    else:
        distinct_runs(args.run_dirs)
        points = [read_run_point(d, args.metric, args.at_step, args.at_tokens, args.smooth, args.min_step)
                  for d in args.run_dirs]
    report, fit = predict(points, args.x, args.holdout, args.target, args.level, args.bootstrap,
                          args.two_var, args.target_tokens, args.seed, args.seed_offsets)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.plot:
        plot_prediction(report, fit, args.plot)
    return 0


def _run_dir_options(parser: ArgumentParser, args: argparse.Namespace) -> list:
    """The options given that only reading run directories uses."""
    keys = ("metric", "at_step", "at_tokens", "min_step", "smooth")
    return ["--" + k.replace("_", "-") for k in keys if getattr(args, k) != parser.get_default(k)]
