"""Import a Hugging Face Llama (or Qwen3) model as the starting point of a megamu run.

    megamu-import-hf HF_DIR --config C --out RUN_DIR [section.key=value ...]

Writes RUN_DIR/imported.pt (megamu's full TP=1 state dict) and RUN_DIR/config.yaml: the config C with the
model's shape from HF_DIR, mup.enabled=false, train.init_from pointing at the weights and train.out_dir at
RUN_DIR. Continue pretraining at any TP/PP layout with
`megamu-train --config RUN_DIR/config.yaml [parallel.tensor=2 ...]`.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from megamu.cli import ArgumentParser, console_script
from megamu.config import load_config, save_config
from megamu.export.hf import require_transformers
from megamu.export.importer import import_hf
from megamu.fileio import atomic_write
from megamu.shipped import resolve_config

WEIGHTS = "imported.pt"


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="a transformers model directory (config.json and weights)")
    parser.add_argument("--config", required=True, help="training config (a file, or a shipped name like tiny)")
    parser.add_argument("--out", required=True, help="the run directory to start")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    require_transformers()
    cfg, state = import_hf(args.hf_dir, load_config(resolve_config(args.config), list(args.overrides)))
    os.makedirs(args.out, exist_ok=True)
    weights = os.path.abspath(os.path.join(args.out, WEIGHTS))
    with atomic_write(weights, "wb") as f:
        torch.save(state, f)
    cfg.train.init_from, cfg.train.out_dir = weights, args.out
    save_config(cfg, os.path.join(args.out, "config.yaml"))
    print(f"imported {args.hf_dir} ({sum(t.numel() for t in state.values()):,} values) -> {weights}; continue "
          f"pretraining with: megamu-train --config {os.path.join(args.out, 'config.yaml')}")
    return 0
