"""Merge a run's tensor-parallel checkpoint shards into one full state dict (torch.save'd).

    python tools/merge_tp_checkpoint.py RUN_DIR --output merged.pt [--tag global_stepN] [--target-tp 1]

The result loads into a single-process `build_model(cfg)` (parallel.tensor=1). --target-tp K pads the
vocabulary as a TP=K run would, for cutting the full tensors into another layout's shards.
"""
from __future__ import annotations

import argparse
import os
import sys

# Runnable as `python tools/X.py` from a checkout, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run directory (train.out_dir) holding config.yaml and checkpoints/")
    parser.add_argument("--output", required=True, help="where to write the merged state dict (.pt)")
    parser.add_argument("--tag", default=None, help="checkpoint tag; default: the newest complete checkpoint")
    parser.add_argument("--target-tp", type=int, default=1,
                        help="pad the vocabulary as for this TP size (default 1: a single process)")
    args = parser.parse_args(argv)

    import torch

    from megamu.config import ConfigError
    from megamu.training.tp_merge import merge_run_checkpoint, run_config

    try:
        shards = run_config(args.run_dir).parallel.tensor
        merged = merge_run_checkpoint(args.run_dir, args.tag, args.target_tp)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    torch.save(merged, args.output)
    params = sum(t.numel() for t in merged.values())
    print(f"merged {shards} TP shards into {len(merged)} tensors ({params:,} values) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
