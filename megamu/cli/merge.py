"""Merge a run's tensor- and pipeline-parallel checkpoint shards into one full state dict (torch.save'd).

    megamu-merge RUN_DIR --output merged.pt [--tag global_stepN] [--target-tp 1]

The result loads into a single-process `build_model(cfg)` (parallel.tensor=1). --target-tp K pads the
vocabulary as a TP=K run would, for cutting the full tensors into another layout's shards.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megamu.checkpoint import merge_run_checkpoint, run_config
from megamu.cli import ArgumentParser, add_checkpoint_arguments, console_script


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(parser)
    parser.add_argument("--output", required=True, help="where to write the merged state dict (.pt)")
    parser.add_argument("--target-tp", type=int, default=1,
                        help="pad the vocabulary as for this TP size (default 1: a single process)")
    args = parser.parse_args(argv)
    parallel = run_config(args.run_dir).parallel
    merged = merge_run_checkpoint(args.run_dir, args.tag, args.target_tp)
    torch.save(merged, args.output)
    params = sum(t.numel() for t in merged.values())
    stages = f" x {parallel.pipeline} pipeline stages" if parallel.pipeline > 1 else ""
    print(f"merged {parallel.tensor} TP shards{stages} into {len(merged)} tensors ({params:,} values) -> {args.output}")
    return 0
