"""Plan a compute-optimal run: the N and D minimising a law's loss at a FLOP budget, and its megamu config.

    megamu-plan --flops C [--law NAME | --law-file LAW.json | --points RUNS.csv]
        [--tokens-per-param R | --params N] [--config PROXY] [--depth L | --aspect R]
        [--hp-rule deepseek|steplaw] [--sweep best.yaml|SWEEP_DIR] [--level P]
        [--json OUT] [--config-out OUT.yaml] [--plot OUT.png] [-- section.key=value ...]

The law is L(N, D) = E + A/N^alpha + B/D^beta: published coefficients by name (default
chinchilla-besiroglu; no interval, as none were published with a covariance), a law file (the "law"
object of a --json report, or megamu-predict --two-var --json output), or a fit to a CSV of runs
(params, tokens, loss), which gives a delta-method interval. FLOPs are C = 6·N·D.
The model is the width rule applied to --config (a shipped name or a YAML file; default
llama_proxy) at the proxy's depth unless --depth or --aspect says otherwise; batch and learning
rate come from --sweep where it sets them, else from the named published rule. The parameter count
needs the vocabulary: pass model.vocab_size=V unless the config's tokenizer is there.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from megamu.cli import ArgumentParser, check_outputs, console_script
from megamu.scaling.hp_rules import RULES
from megamu.scaling.nd_law import PUBLISHED, fit_law, load_law_file, published_law
from megamu.scaling.plan_plot import plot_plan
from megamu.scaling.planner import format_plan, plan, write_config


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, help="the compute budget C in FLOPs (C = 6·N·D)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--law", choices=sorted(PUBLISHED),
                        help="published coefficients (default chinchilla-besiroglu)")
    source.add_argument("--law-file", metavar="LAW.json", help="a fitted law (see megamu.scaling.nd_law)")
    source.add_argument("--points", metavar="RUNS.csv", help="fit the law here to runs with params, tokens, loss")
    parser.add_argument("--huber", type=float, metavar="DELTA", help="with --points: Huber loss with this δ on log L")
    constraint = parser.add_mutually_exclusive_group()
    constraint.add_argument("--tokens-per-param", type=float, metavar="R", help="fix D/N = R instead of optimising")
    constraint.add_argument("--params", type=float, metavar="N", help="fix N instead of optimising")
    parser.add_argument("--config", default="llama_proxy", help="the μP proxy: a YAML file or a shipped name")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--depth", type=int, help="layers of the planned model (default: the proxy's)")
    shape.add_argument("--aspect", type=float, help="depth = width / ASPECT (e.g. 128)")
    parser.add_argument("--hp-rule", choices=sorted(RULES), default="deepseek",
                        help="published batch-size and learning-rate rule (default deepseek)")
    parser.add_argument("--sweep", metavar="best.yaml", help="megamu-sweep's best.yaml (or its directory): wins")
    parser.add_argument("--level", type=float, default=0.9, help="interval coverage (default 0.9)")
    parser.add_argument("--out-dir", default="runs/plan", help="train.out_dir of the written config")
    parser.add_argument("--json", metavar="OUT", help="write the plan as JSON (its 'law' is a law file)")
    parser.add_argument("--config-out", metavar="OUT.yaml", help="write the config for megamu-train --config")
    parser.add_argument("--plot", metavar="OUT.png", help="write the IsoFLOP curves with the optimum")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides of the proxy config; put them before the options or after --")
    return parser


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(args, "json", "plot", "config_out")
    if args.flops is None:
        parser.error("give the compute budget: --flops C (e.g. --flops 1e21)")
    if args.huber is not None and not args.points:
        parser.error("--huber applies to a fit: use it with --points")
    if args.law_file:
        law = load_law_file(args.law_file)
    elif args.points:
        law = fit_law(args.points, args.huber)
    else:
        law = published_law(args.law or "chinchilla-besiroglu")
    report, cfg = plan(law, args.flops, args.config, args.overrides, args.tokens_per_param, args.params,
                       args.depth, args.aspect, args.hp_rule, args.sweep, args.level, args.out_dir)
    print(format_plan(report))
    if args.config_out:
        write_config(cfg, report, args.config_out)
        report["config_out"] = args.config_out
        print(f"wrote {args.config_out}: megamu-train --config {args.config_out}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    if args.plot:
        plot_plan(report, law, args.plot)
    return 0
