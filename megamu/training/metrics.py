"""Run-directory metrics (rank 0 only): metrics.jsonl per DESIGN.md, a console line per log
interval, a progress bar, optional wandb and tensorboard, and the loss-curve PNG.

metrics.jsonl: first {"kind": "meta", ...}, then {"kind": "train", "step", "tokens", "flops",
"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "time_s"} and {"kind": "eval", "step",
"tokens", "flops", "val_loss", "val_bpb"}. A resumed run appends to the file.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from typing import Any, Optional

from megamu.config import Config
from megamu.errors import MegamuWarning

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def mfu(tokens_per_s: float, flops_per_token: float, world_size: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: the model's FLOP/s over the peak of all `world_size` devices
    (`peak_flops` per device, from megamu.runtime.peak_flops)."""
    return tokens_per_s * flops_per_token / (peak_flops * world_size)


def bits_per_byte(loss_nats: float, bytes_per_token: Optional[float]) -> Optional[float]:
    """Bits per UTF-8 byte from a per-token loss in nats; None when the byte count is unknown."""
    if not bytes_per_token:
        return None
    return loss_nats / math.log(2) / bytes_per_token


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def console_line(record: dict[str, Any], max_steps: int, eta_s: float) -> str:
    return (f"step {record['step']}/{max_steps} | loss {_fmt(record['loss'], '.4f')} | lr {record['lr']:.3e} | "
            f"grad norm {_fmt(record['grad_norm'], '.3f')} | {record['tokens_per_s']:,.0f} tok/s | "
            f"MFU {_fmt(record['mfu'], '.1%')} | ETA {format_eta(eta_s)}")


class RunLogger:
    """All rank-0 outputs of a run. On other ranks every method is a no-op."""

    def __init__(self, cfg: Config, meta: dict[str, Any], is_writer: bool, start_step: int) -> None:
        self.enabled = is_writer
        self.cfg = cfg
        self.run_dir = cfg.train.out_dir
        self.bar = None
        self.wandb_run = None
        self.tensorboard = None
        if not self.enabled:
            return
        path = os.path.join(self.run_dir, METRICS_FILE)
        if os.path.exists(path):
            _drop_torn_record(path)
        new_file = not os.path.exists(path) or os.path.getsize(path) == 0
        self.file = open(path, "a", buffering=1)
        if new_file:
            self._write({"kind": "meta", **meta})
        if cfg.log.progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        if cfg.log.wandb_project:
            self.wandb_run = _start_wandb(cfg, meta)
        if cfg.log.tensorboard:
            self.tensorboard = _start_tensorboard(self.run_dir)

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log_train(self, record: dict[str, Any], eta_s: float) -> None:
        if not self.enabled:
            return
        record = {"kind": "train", **record}
        self._write(record)
        self._print(console_line(record, self.cfg.train.max_steps, eta_s))
        self._to_trackers(record, prefix="train")

    def log_eval(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": "eval", **record}
        self._write(record)
        bpb = f" | val bpb {record['val_bpb']:.4f}" if record.get("val_bpb") is not None else ""
        self._print(f"eval step {record['step']} | val loss {record['val_loss']:.4f}{bpb}")
        self._to_trackers(record, prefix="eval")

    def message(self, text: str) -> None:
        if self.enabled:
            self._print(text)

    def _to_trackers(self, record: dict[str, Any], prefix: str) -> None:
        scalars = {f"{prefix}/{k}": v for k, v in record.items()
                   if k not in ("kind", "step") and isinstance(v, (int, float))}
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["step"])
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.file.close()


def _start_wandb(cfg: Config, meta: dict[str, Any]) -> Any:
    import wandb

    # Offline by default: works with no network; `wandb sync` uploads later.
    os.environ.setdefault("WANDB_MODE", cfg.log.wandb_mode)
    return wandb.init(project=cfg.log.wandb_project, dir=cfg.train.out_dir, mode=cfg.log.wandb_mode,
                      name=os.path.basename(os.path.abspath(cfg.train.out_dir)),
                      config={**cfg.to_dict(), "meta": meta})


def _start_tensorboard(run_dir: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("log.tensorboard=true but the tensorboard package is not installed; skipping it "
                      "(pip install tensorboard)")
        return None
    return SummaryWriter(os.path.join(run_dir, "tensorboard"))


def read_metrics(run_dir: str) -> tuple[dict, list[dict], list[dict]]:
    """(meta, train records, eval records) of RUN_DIR/metrics.jsonl, records sorted by step.

    A step logged twice (a run resumed from an earlier checkpoint) keeps its later record. Raises
    FileNotFoundError for a missing file and ValueError naming file and line for a malformed one.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} does not exist: check the path (or the run never started)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run directory {run_dir} has no {METRICS_FILE}: is it a megamu run directory?")
    meta = None
    by_kind: dict = {"train": {}, "eval": {}}
    with open(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if not line.endswith("\n"):  # the last line, cut short by a writer that was killed
                    warnings.warn(f"{path}:{line_no}: skipped the last line, a record cut short (what a "
                                  f"trainer killed while writing leaves)", MegamuWarning)
                    continue
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg}); a metrics file is written by "
                                 f"megamu-train, one JSON record per line: fix or remove that line") from None
            kind = record.get("kind")
            if kind == "meta" and meta is None:
                meta = record
            elif kind in by_kind:
                if "step" not in record:
                    raise ValueError(f"{path}:{line_no}: {kind} record has no step")
                by_kind[kind][record["step"]] = record
    if meta is None:
        raise ValueError(f"{path} has no meta record (the trainer writes it as the first line)")
    train, evals = ([records[s] for s in sorted(records)] for records in by_kind.values())
    return meta, train, evals


def _drop_torn_record(path: str) -> None:
    """Cut a last line left without its newline by a killed writer: appending after it would glue the next
    record onto it, and one complete record per line is what readers rely on."""
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - (1 << 20)))  # a record is far shorter than this
        tail = handle.read()
        if not tail or tail.endswith(b"\n"):  # empty, or its last record complete
            return
        keep = size - len(tail) + tail.rfind(b"\n") + 1
        handle.truncate(keep)
    warnings.warn(f"{path}: dropped its last {size - keep} bytes, a record cut short when the run was stopped",
                  MegamuWarning)


def plot_loss_curve(run_dir: str, out_path: Optional[str] = None) -> str:
    """Training loss vs step with validation points, from RUN_DIR/metrics.jsonl; returns the PNG path.

    For steps logged twice (a run resumed from an earlier checkpoint) the later record wins.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, train_records, eval_records = read_metrics(run_dir)
    train = {r["step"]: r["loss"] for r in train_records}
    evals = {r["step"]: r["val_loss"] for r in eval_records}
    out_path = out_path or os.path.join(run_dir, LOSS_CURVE_FILE)
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = sorted(train)
    ax.plot(steps, [train[s] for s in steps], label="train loss", lw=1.2)
    if evals:
        eval_steps = sorted(evals)
        ax.plot(eval_steps, [evals[s] for s in eval_steps], "o", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
