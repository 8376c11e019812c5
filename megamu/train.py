"""Training entry point.

    python -m megamu.train --config configs/X.yaml [section.key=value ...] [--deepspeed_config ds_configs/zeroN.json]
    deepspeed [--hostfile H] --module megamu.train --config configs/X.yaml ...

Exit codes: 0 done, 1 config error (before anything is allocated), 3 stopped after
train.max_bad_steps consecutive non-finite steps (a checkpoint was saved).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from megamu.config import Config, ConfigError, load_config
from megamu.training.metrics import plot_loss_curve

EXIT_CONFIG_ERROR = 1
EXIT_DIVERGED = 3

__all__ = ["main", "train", "plot_loss_curve", "parse_args"]


def train(cfg: Config) -> dict[str, Any]:
    """Train per `cfg` on this rank and return the summary (see megamu.training.loop.train)."""
    from megamu.training.loop import train as run_training

    return run_training(cfg)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megamu.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (sections model, mup, parallel, data, train, log)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        help="DeepSpeed json (ds_configs/zeroN.json); same as train.deepspeed_config=...")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; ignored (LOCAL_RANK is read from the environment)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after options


def main(argv: Optional[list[str]] = None) -> int:
    from megamu.training.guards import TrainingDiverged

    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    try:
        cfg = load_config(args.config, overrides)
        summary = train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except TrainingDiverged as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    val = f", val loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""
    # A resumed run that was already complete trains no step, so it has no new train loss.
    loss = f", final loss {summary['final_loss']:.4f}" if summary["final_loss"] is not None else ""
    print(f"done: {summary['step']} steps{loss}{val}; run dir {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
