"""Training entry point.

    megamu-train --config configs/X.yaml [section.key=value ...] [--deepspeed_config ds_configs/zeroN.json]
    python -m megamu.train ...  (the same)
    deepspeed [--hostfile H] --module megamu.train --config configs/X.yaml ...

--config is a YAML file or the name of a shipped config (tiny, llama_125m, ...), and
--deepspeed_config a json file or a shipped name (zero0 ... zero3).

Exit codes: 0 done, or stopped by SIGTERM after a step with a checkpoint (preempted; resume with
train.resume=true), 2 user error (a bad config, data file or checkpoint; one `error:` line from the first
rank of each node, or from the one rank whose own checkpoint file is bad, and no traceback),
3 stopped after train.max_bad_steps consecutive non-finite steps (a checkpoint was saved), 4 another
rank was lost (its heartbeat stopped; one `error:` line names it), 143 SIGTERM but the step and its
checkpoint did not finish within train.preempt_grace_s.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from megamu.cli import ArgumentParser, console_script
from megamu.config import Config, load_config
from megamu.errors import EXIT_USER_ERROR, MegamuError
from megamu.shipped import resolve_config
from megamu.training.metrics import plot_loss_curve

EXIT_DIVERGED = 3

__all__ = ["main", "train", "plot_loss_curve", "parse_args"]


def train(cfg: Config) -> dict[str, Any]:
    """Train per `cfg` on this rank and return the summary (see megamu.training.loop.train)."""
    from megamu.training.loop import train as run_training

    return run_training(cfg)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config or a shipped name (sections model, mup, parallel, data, "
                                         "train, log)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        help="DeepSpeed json (ds_configs/zeroN.json) or a shipped name (zeroN); same as "
                             "train.deepspeed_config=...")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; ignored (LOCAL_RANK is read from the environment)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after options


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`megamu-train`: the exit code of the run (0 done or preempted, 2 user error, 3 diverged)."""
    return _end_failed_rank(_run(argv))


def _end_failed_rank(code: int) -> int:
    """A rank that fails after joining the process groups still has gloo and store threads running, and
    tearing the interpreter down under them can abort (SIGABRT) instead of returning `code`: everything
    the run writes is closed by now, so end the process at once."""
    if code != 0:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


@console_script
def _run(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _train_from_args(argv)
    except (MegamuError, FileNotFoundError) as error:
        if _says_user_errors() or not getattr(error, "every_rank", True):
            raise  # printed as one `error:` line by console_script
        return EXIT_USER_ERROR


def _says_user_errors() -> bool:
    """Whether this rank prints a user error: the first rank of each node does. The node's other ranks read
    the same config and files, so they would only repeat its line; they exit with the same code, quietly.
    A problem with one rank's own files (every_rank False) is said by that rank."""
    from megamu.parallel.launch_env import derive_launch_env  # only now: it imports torch

    try:
        return derive_launch_env(os.environ).local_rank == 0
    except MegamuError:  # the launcher's variables are the problem: say it
        return True


def _train_from_args(argv: Optional[Sequence[str]]) -> int:
    from megamu.training.guards import TrainingDiverged

    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    cfg = load_config(resolve_config(args.config), overrides)
    try:
        summary = train(cfg)
    except TrainingDiverged as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    val = f", val loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""
    # A resumed run that was already complete trains no step, so it has no new train loss.
    loss = f", final loss {summary['final_loss']:.4f}" if summary["final_loss"] is not None else ""
    ended = "preempted (SIGTERM) after" if summary["preempted"] else "done:"
    print(f"{ended} {summary['step']} steps{loss}{val}; run dir {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
