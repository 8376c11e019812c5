"""Coordinate check: mean |activation| per module per step across widths, as JSON and a log-log plot.

    megamu-coord-check --config tiny --widths 64,128,256,512 --steps 3 \\
        --json coord_mup.json --plot coord_mup.png [--sp] [--seeds N] [--data PREFIX] [section.key=value ...]

--config is a YAML file or the name of a shipped config; without it, the defaults and the overrides.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from megamu.cli import ArgumentParser, console_script, int_list
from megamu.config import load_config, resolve
from megamu.scaling import coord_check
from megamu.shipped import resolve_config


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="config, a YAML file or a shipped name (model shape, mup.*, train.lr, ...)")
    parser.add_argument("--widths", type=int_list, default=[64, 128, 256, 512], help="comma-separated hidden sizes")
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps to take (step 0 = at init)")
    parser.add_argument("--seeds", type=int, default=1, help="average mean|act| over this many inits")
    parser.add_argument("--sp", action="store_true", help="standard parametrization instead of μP")
    parser.add_argument("--data", help=".bin/.idx prefix to draw batches from (default: data.path, else "
                                       "random tokens)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: train.micro_batch_size)")
    parser.add_argument("--json", required=True, help="output JSON path")
    parser.add_argument("--plot", help="output PNG path")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    return parser.parse_args(argv)


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_config(resolve_config(args.config), args.overrides)
    resolve(cfg, check_files=False)
    batch_size = args.batch_size or cfg.train.micro_batch_size
    batches = coord_check.token_batches(cfg, args.steps + 1, batch_size, args.data or cfg.data.path)
    result = coord_check.run_coord_check(cfg, args.widths, args.steps, batches, mup_enabled=not args.sp,
                                           seeds=args.seeds)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    if args.plot:
        coord_check.plot(result, args.plot)
    print(f"{result['parametrization']}: slope of log mean|act| vs log width at step {args.steps}")
    for module, slope in coord_check.slopes(result, args.steps).items():
        print(f"  {module:20s} {slope:+.3f}")
    return 0
