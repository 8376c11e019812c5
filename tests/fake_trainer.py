"""A stand-in for `python -m megamu.train` in sweep and ladder tests: same command line, instant.

Writes RUN_DIR/metrics.jsonl (DESIGN.md schema) from a formula of the overrides:
  train loss = 2 + 40·params^-0.3 + (log10(lr) + 2.5)² + 0.05·output_mult + 1/step
        + 0.001·(seed mod 3 - 1)   (train.seed: seeds 1, 2, 3 average to no offset)
  val loss   = the final train loss - 0.1·output_mult (so train and val prefer different α_out)
with params = 24·width² + 1024·width. Special learning rates act out the other endings:
  lr >= 1     non-finite losses, then exit 3 (the trainer's non-finite guard)
  lr == 0.5   finite but huge losses (above ln(vocab)), exit 0
  lr == 0.25  a crash: a traceback on stderr, exit 1
It also writes RUN_DIR/config.yaml with train.seed. Each call appends its run directory to $FAKE_TRAINER_CALLS when that is set.
"""
from __future__ import annotations

import json
import math
import os
import sys

VOCAB = 512


def main(argv: list[str]) -> int:
    overrides = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))
    out_dir = overrides["train.out_dir"]
    lr = float(overrides.get("train.lr", 3e-3))
    steps = int(overrides.get("train.max_steps", 10))
    width = int(overrides.get("model.hidden_size", 64))
    mult = float(overrides.get("mup.output_mult", 1.0))
    seed = int(overrides.get("train.seed", 1))
    if os.environ.get("FAKE_TRAINER_CALLS"):
        with open(os.environ["FAKE_TRAINER_CALLS"], "a") as calls:
            calls.write(out_dir + "\n")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.yaml"), "w") as config:  # the resolved config, as the trainer saves it
        json.dump({"train": {"seed": seed, "lr": lr, "max_steps": steps}}, config)  # JSON is valid YAML
    params = 24 * width * width + 2 * VOCAB * width
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as metrics:
        def write(record: dict) -> None:
            metrics.write(json.dumps(record) + "\n")

        write({"kind": "meta", "params": params, "hidden_size": width, "vocab_size": VOCAB})
        if lr == 0.25:
            print("Traceback (most recent call last):\nRuntimeError: boom", file=sys.stderr)
            return 1
        base = 2 + 40 * params ** -0.3 + (math.log10(lr) + 2.5) ** 2 + 0.05 * mult + 0.001 * (seed % 3 - 1)
        loss = base
        for step in range(1, steps + 1):
            loss = None if lr >= 1 and step > 2 else 50.0 if lr == 0.5 else base + 1 / step
            write({"kind": "train", "step": step, "tokens": step * 1024, "flops": step * 6e6, "loss": loss})
            if loss is None and step >= 5:
                print("training stopped: 3 consecutive steps with non-finite loss", file=sys.stderr)
                return 3
        write({"kind": "eval", "step": steps, "tokens": steps * 1024, "flops": steps * 6e6,
               "val_loss": loss - 0.1 * mult})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
