"""μP hyper-parameter sweep: grid or random search, one run directory per point, resumable.

    megamu-sweep --config mup_proxy --out runs/sweep \\
        --grid train.lr=1e-3,3e-3,1e-2 mup.output_mult=1,4 [--widths 64,128] [--parallel 2] \\
        [--metric train|val] [--smooth 10] [--diverge-above X] [-- section.key=value ...]
    megamu-sweep --config C --out D --random 16 --grid train.lr=1e-4:3e-2 mup.init_std=0.005:0.05

--config is a YAML file or the name of a shipped config (tiny, mup_proxy, ...). Writes D/<run>/
(one per point), D/sweep.json, D/best.yaml (config overlay), D/sweep.png (loss vs log2 of the LR
per width) and D/heatmap.png (two axes). Run it again to resume: finished and diverged runs are
kept, the others are (re)launched.
"""
from __future__ import annotations

import argparse
import shlex
from typing import Optional, Sequence

from megamu.cli import ArgumentParser, console_script, int_list
from megamu.scaling.launch import DEFAULT_TRAINER, MetricRule
from megamu.scaling.sweep import (
    SweepPlan,
    check_axes,
    format_best,
    format_table,
    grid_points,
    parse_axis,
    random_points,
    run_sweep,
)
from megamu.shipped import resolve_config


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="base config, a YAML file or a shipped name (the proxy model)")
    parser.add_argument("--out", required=True, help="sweep directory (run directories, sweep.json, best.yaml)")
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2|KEY=LOW:HIGH",
                        help="swept keys: listed values, or LOW:HIGH log-uniform ranges with --random")
    parser.add_argument("--random", type=int, metavar="N", help="sample N points instead of the full grid")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random sampling")
    parser.add_argument("--widths", type=int_list, help="comma-separated widths (fixed head dim); default: the config's")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--metric", choices=("train", "val"), default="train",
                        help="score: final smoothed train loss or final val loss")
    parser.add_argument("--smooth", type=int, default=10, help="train records averaged for --metric train")
    parser.add_argument("--diverge-above", type=float,
                        help="a final loss above this is 'diverged' (default: ln(vocab), a uniform guess)")
    parser.add_argument("--trainer", default=shlex.join(DEFAULT_TRAINER),
                        help="trainer command receiving --config, overrides, train.out_dir=... (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides for every run; put them before --grid or after --")
    return parser


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config = resolve_config(args.config)
    axes = [parse_axis(spec, allow_range=args.random is not None) for spec in args.grid]
    check_axes(axes, config, args.overrides)
    points = random_points(axes, args.random, args.seed) if args.random else grid_points(axes)
    plan = SweepPlan(config, list(args.overrides), points, args.widths or [None], args.out)
    rule = MetricRule(args.metric, args.smooth, args.diverge_above)
    results, summary = run_sweep(plan, rule, args.parallel, shlex.split(args.trainer))
    print()
    print(format_table(results, rule))
    print()
    print(format_best(summary))
    return 0 if summary["best"] is not None else 1
