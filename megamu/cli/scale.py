"""Width ladder with transferred μP hyper-parameters, then (optionally) the loss prediction.

    megamu-scale --config mup_proxy --overlay runs/sweep/best.yaml \\
        --widths 64,96,128,192,256 | --params 1e6,2e6,4e6 \\
        [--steps N | --tokens-per-param R] [--seeds 1,2,3] --out runs/ladder [--parallel 2] \\
        [--predict [--holdout 1] [--target X | --target-mult 8] [--metric train|val]] [-- section.key=value ...]

--config is a YAML file or the name of a shipped config. Widths keep the proxy's head dimension
(n_heads = width / head_dim) and mup.base_hidden_size; --params picks, for each target count, the
multiple of the head dimension nearest to it. Every rung is a run directory DIR/w<width>
(DIR/w<width>_s<seed> with --seeds: every width once per seed); re-running resumes (finished rungs
are kept). --predict fits L = a·params^b + c on all but the --holdout largest widths (all their
seeds) and writes DIR/prediction.{json,png}; with several --seeds the fit has a per-seed offset (a
seed's luck is shared across widths under μP) and scores the mean of the held-out widths' seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
from typing import Optional, Sequence

from megamu.cli import ArgumentParser, console_script
from megamu.scaling.ladder import (
    TokenBudget,
    format_ladder,
    plan_ladder,
    predict_ladder,
    width_for_params,
)
from megamu.scaling.launch import DEFAULT_TRAINER, MetricRule, run_all
from megamu.scaling.plot import plot_prediction
from megamu.scaling.predict import format_report
from megamu.scaling.sweep import overlay_overrides
from megamu.shipped import resolve_config


def number_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="base config, a YAML file or a shipped name (the μP proxy)")
    parser.add_argument("--overlay", help="transferred hyper-parameters (best.yaml of megamu-sweep)")
    rungs = parser.add_mutually_exclusive_group(required=True)
    rungs.add_argument("--widths", type=number_list, help="comma-separated widths (multiples of the head dim)")
    rungs.add_argument("--params", type=number_list, help="comma-separated target parameter counts")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="fixed steps for every rung (default: the config's max_steps)")
    budget.add_argument("--tokens-per-param", type=float, help="tokens ∝ params: steps = ceil(R·params / batch tokens)")
    parser.add_argument("--seeds", type=number_list, default=[],
                        help="train every width once per seed (train.seed); the fit sees every run")
    parser.add_argument("--out", required=True, help="ladder directory (one run directory per width)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--trainer", default=shlex.join(DEFAULT_TRAINER), help="trainer command (default: %(default)s)")
    parser.add_argument("--metric", choices=("train", "val"), default="train", help="loss to fit: train or val")
    parser.add_argument("--smooth", type=int, default=10, help="train records averaged for --metric train")
    parser.add_argument("--min-step", type=int, help="fit losses from this step on (default: see megamu-predict)")
    parser.add_argument("--predict", action="store_true", help="fit the ladder and predict")
    parser.add_argument("--holdout", type=int, default=1, help="with --predict: rungs held out to score the fit")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target", type=float, help="with --predict: predict the loss at this many params")
    target.add_argument("--target-mult", type=float, help="with --predict: target = this × the largest rung's params")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides for every rung; put them before the options or after --")
    return parser


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config = resolve_config(args.config)
    overrides = [*(overlay_overrides(args.overlay) if args.overlay else []), *args.overrides]
    widths = ([int(w) for w in args.widths] if args.widths
              else [width_for_params(config, overrides, p) for p in args.params])
    budget = TokenBudget(args.steps, args.tokens_per_param)
    specs = plan_ladder(config, overrides, sorted(set(widths)), budget, args.out, [int(seed) for seed in args.seeds])
    rule = MetricRule(args.metric, args.smooth)
    results = run_all(specs, rule, args.parallel, shlex.split(args.trainer))
    print()
    print(format_ladder(results, rule))
    if not args.predict:
        return 0 if all(r.status == "done" for r in results) else 1
    largest = max(r.labels["params"] for r in results)
    target = args.target or (args.target_mult * largest if args.target_mult else None)
    report, fit, dropped = predict_ladder(results, args.holdout, target, args.metric, args.smooth, args.min_step,
                                          seed_offsets=len(args.seeds) > 1)
    for note in dropped:
        print(f"left out of the fit: {note}")
    print()
    print(format_report(report))
    with open(os.path.join(args.out, "prediction.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    plot_prediction(report, fit, os.path.join(args.out, "prediction.png"))
    print(f"\nwrote {os.path.join(args.out, 'prediction.json')} and prediction.png")
    return 0
