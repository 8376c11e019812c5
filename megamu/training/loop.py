"""The training loop: config checks, engine, data, steps, evaluation, checkpoints, metrics.

`train(cfg)` runs on every rank (one process per rank, launched by `deepspeed` or torchrun-like
env vars; a plain process is a world of one) and returns a summary dict.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megamu.checkpoint import (DataPosition, check_loaded_position, check_resume, current_layout, load_checkpoint,
                               plan_resume, read_pointer, resume_tag, save_checkpoint, save_data_position, tag_for,
                               with_load_universal)
from megamu.config import Config, data_parallel_size, data_prefixes, resolve, save_config, text_vocab_size
from megamu.data.vocabulary import check_token_ids
from megamu.errors import MegamuError
from megamu.parallel.watchdog import start_watchdog
from megamu.runtime import loader_workers, peak_flops, train_dtype
from megamu.training.ds_config import build_ds_config, zero_stage
from megamu.training.engine import build_engine
from megamu.training.guards import BadStepCounter, TrainingDiverged, is_finite
from megamu.training.metrics import RunLogger, bits_per_byte, mfu, plot_loss_curve
from megamu.training.preemption import Preemption
from megamu.training.schedule import base_lr


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _bytes_per_token(cfg: Config) -> Optional[float]:
    """Bytes per token of the (blended) data, for bits per byte; None when unknown, or when the loss is not
    the text's next-token loss (bert's masked and t5's hidden tokens are a biased fifth of the text)."""
    from megamu.data.objectives import OBJECTIVES

    if cfg.model.arch in OBJECTIVES:
        return None
    if cfg.data.bytes_per_token:
        return cfg.data.bytes_per_token
    from megamu.data import dataset_bytes_per_token

    prefixes = data_prefixes(cfg)
    weights = [float(w) for w in cfg.data.paths[0::2]] if cfg.data.paths else [1.0]
    per_prefix = [dataset_bytes_per_token(p) for p in prefixes]
    if any(b is None for b in per_prefix):
        return None
    return sum(w * b for w, b in zip(weights, per_prefix)) / sum(weights)


@dataclass
class Progress:
    step: int = 0  # optimizer steps done (skipped ones included: their data is consumed)
    # Samples the steps done have drawn; counted here, not by the sampler, which loader workers run ahead of.
    consumed_samples: int = 0
    skipped_steps: int = 0
    train_losses: list = field(default_factory=list)
    last_eval: Optional[dict] = None
    preempted: bool = False  # stopped early by SIGTERM, with a checkpoint


class Trainer:
    def __init__(self, cfg: Config) -> None:
        from megamu.parallel import initialize_parallel
        from megamu.parallel.launch_env import apply_launch_env
        from megamu.training.run_lock import hold_run_lock

        # srun / mpirun give the world size in their own variables: derive it before validating the config.
        world_size = apply_launch_env().world_size
        self.notes = resolve(cfg, world_size, need_data=True)
        self.cfg = cfg
        check_token_ids(data_prefixes(cfg), cfg.model.vocab_size, cfg.data.tokenizer_model,
                        cfg.model.vocab_size - text_vocab_size(cfg))
        dp_size = data_parallel_size(cfg, world_size)
        self.ds_config = build_ds_config(cfg, dp_size)  # refuses bad combinations before any allocation
        t = cfg.train
        self.state = initialize_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.timeout_minutes)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_writer = self.rank == 0
        # Before the resume plan, watchdog and engine: a second job on this directory is refused on every rank.
        hold_run_lock(t.out_dir, self.rank)
        self.ckpt_dir = os.path.join(t.out_dir, "checkpoints")
        # The pointer's checkpoint, or the newest intact one before it when a file of it is missing or truncated.
        tag = resume_tag(self.ckpt_dir) if t.resume else None
        # Before anything is loaded or written: a resume may not change the model, and says what else it changes.
        self.resume_changes = check_resume(cfg, self.ckpt_dir, tag)
        self.train_samples = self._train_samples()
        # Before the engine, which must be built to load a universal checkpoint; and before the watchdog, so
        # that a refused resume ends every rank as a user error.
        self.resume_plan = plan_resume(self.ckpt_dir, tag, current_layout(zero_stage(self.ds_config))) if tag else None
        if self.resume_plan is not None and self.resume_plan.universal:
            self.ds_config = with_load_universal(self.ds_config)
        # From here on a lost peer ends this rank within the heartbeat timeout, naming the peer.
        self.watchdog = start_watchdog(cfg.parallel.heartbeat_timeout_s)
        try:
            self._build()
        except BaseException as error:
            self._report_failure(error)
            raise

    def _train_samples(self) -> int:
        """The size of the train dataset's shuffle (see checkpoint/compat.py); notes what a resume changes."""
        t = self.cfg.train
        if self.resume_changes is not None:
            self.notes += self.resume_changes.notes
            return self.resume_changes.train_samples
        if t.resume:
            self.notes.append(f"no checkpoint found in {self.ckpt_dir}, starting from step 0")
        return t.max_steps * t.global_batch_size

    def _build(self) -> None:
        """Data, engine and run metadata: everything after the watchdog starts."""
        from megamu.data import build_datasets
        from megamu.data.objectives import objective_datasets
        from megamu.model import flops_per_token, param_counts
        from megamu.parallel.random import seed_tensor_parallel_rng

        cfg, t = self.cfg, self.cfg.train
        self.preemption = Preemption(t.preempt_grace_s, self._resume_point)
        if self.is_writer:
            os.makedirs(t.out_dir, exist_ok=True)

        _seed_everything(t.seed)
        # Dropout inside TP regions draws from a per-TP-rank stream (megamu.parallel.random).
        seed_tensor_parallel_rng(t.seed, self.state.get_tensor_model_parallel_group())
        self.datasets = objective_datasets(cfg, build_datasets(cfg, {"train": self.train_samples,
                                                                     "valid": t.eval_iters * t.global_batch_size}))
        self.bytes_per_token = _bytes_per_token(cfg)
        self.optimizer_step = build_engine(cfg, self.ds_config, self.state)
        self.engine = self.optimizer_step.engine  # the DeepSpeed engine: evaluation and checkpoints
        self.tokens_per_step = cfg.tokens_per_step
        self.flops_per_token = flops_per_token(cfg)
        self.peak = peak_flops(train_dtype(t.dtype))
        counts = param_counts(cfg)
        self.meta = {
            "params": counts["total"], "non_embedding_params": counts["non_embedding"],
            "flops_per_token": self.flops_per_token, "hidden_size": cfg.model.hidden_size,
            "n_layers": cfg.model.n_layers, "tp": cfg.parallel.tensor, "pp": cfg.parallel.pipeline,
            "dp": self.state.get_data_parallel_world_size(), "n_heads": cfg.model.n_heads,
            "seq_len": cfg.model.seq_len, "vocab_size": cfg.model.vocab_size,
            "global_batch_size": t.global_batch_size, "max_steps": t.max_steps, "lr": t.lr,
            "schedule": t.schedule, "optimizer": t.optimizer, "mup": cfg.mup.enabled,
            "width_mult": cfg.width_mult, "zero_stage": zero_stage(self.ds_config), "dtype": train_dtype(t.dtype),
            "world_size": self.world_size, "peak_flops": self.peak.flops, "peak_source": self.peak.source,
        }

    # ---- data -----------------------------------------------------------------------------
    def _batches(self, split: str, num_samples: int, consumed: int = 0) -> "torch.utils.data.DataLoader":
        from megamu.data.sampler import DistributedBatchSampler, make_dataloader

        t = self.cfg.train
        sampler = DistributedBatchSampler(num_samples, t.global_batch_size, t.micro_batch_size,
                                          self.state.get_data_parallel_rank(),
                                          self.state.get_data_parallel_world_size(), consumed_samples=consumed)
        return make_dataloader(self.datasets[split], sampler, loader_workers(self.cfg.data.loader_workers))

    # ---- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> Optional[dict]:
        t = self.cfg.train
        if t.eval_iters <= 0 or "valid" not in self.datasets:
            return None
        loader = self._batches("valid", t.eval_iters * t.global_batch_size)
        val_loss = self.optimizer_step.validation_loss(loader)
        return {"val_loss": val_loss, "val_bpb": bits_per_byte(val_loss, self.bytes_per_token)}

    # ---- checkpoints ----------------------------------------------------------------------
    def _save(self, progress: Progress, diverged: bool = False) -> str:
        # Under one key: DeepSpeed strips its own names (skipped_steps, global_steps, ...) from client state.
        client_state = {"megamu": {"step": progress.step, "skipped_steps": progress.skipped_steps,
                                   "sampler": {"consumed_samples": progress.consumed_samples},
                                   **self._counters(progress)}}
        if self.is_writer and not diverged:  # the pointer never names a diverged checkpoint
            save_data_position(self.ckpt_dir, tag_for(progress.step),
                               DataPosition(progress.step, progress.consumed_samples, self.train_samples))
        return save_checkpoint(self.engine, self.ckpt_dir, progress.step, client_state, self.cfg, diverged=diverged)

    def _resume(self, progress: Progress) -> None:
        """Load the newest complete checkpoint into the engine and `progress`, if asked to."""
        if self.resume_plan is None:
            return
        client = load_checkpoint(self.engine, self.ckpt_dir, self.resume_plan)
        saved = client["megamu"]
        progress.step = int(saved["step"])
        progress.skipped_steps = int(saved["skipped_steps"])
        progress.consumed_samples = int(saved["sampler"]["consumed_samples"])
        check_loaded_position(self.resume_changes.position, progress.consumed_samples,
                              f"checkpoint {self.resume_plan.tag} in {self.ckpt_dir}")

    def _restart_advice(self) -> str:
        """Where a resume after a divergence starts: the pointer never names the diverged weights."""
        tag = read_pointer(self.ckpt_dir)
        if tag is None:
            return "start again (no checkpoint was saved before these steps)"
        return f"resume with train.resume=true: it continues from checkpoint {tag}, saved before these steps"

    def _resume_point(self) -> str:
        tag = read_pointer(self.ckpt_dir)
        return f"checkpoint {tag} in {self.ckpt_dir}" if tag else f"no checkpoint (none complete in {self.ckpt_dir})"

    # ---- the run --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to the last step, or until SIGTERM (summary["preempted"]); every rank must call it."""
        try:
            with self.preemption:
                summary = self._train()
        except BaseException as error:
            self._report_failure(error)
            raise
        if self.watchdog is not None:
            dist.barrier()  # every rank is done: from now on silence is not a loss
            self.watchdog.stop()
        return summary

    def _report_failure(self, error: BaseException) -> None:
        """Tell the peers' watchdogs this rank is ending, so they stop naming it rather than waiting."""
        if self.watchdog is not None:
            # A user error or a divergence is every rank's own; anything else may echo a lost peer.
            self.watchdog.fail(maybe_peer_loss=not isinstance(error, (MegamuError, TrainingDiverged)))

    def _train(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        progress = Progress()
        self._resume(progress)
        if self.is_writer:  # only now: a failed resume leaves the config that describes the checkpoint
            save_config(cfg, os.path.join(t.out_dir, "config.yaml"))
        start_step = progress.step
        loader = self._batches("train", self.train_samples, progress.consumed_samples)
        batches = iter(loader)
        last_step = t.stop_at_step or t.max_steps
        logger = RunLogger(cfg, self.meta, self.is_writer, start_step)
        for note in self.notes:
            logger.message(note)
        if start_step:
            logger.message(f"resumed from {tag_for(start_step)} in {self.ckpt_dir}")
        guard = BadStepCounter(t.max_bad_steps)
        run_start = window_start = time.perf_counter()
        window_steps = 0
        try:
            while progress.step < last_step:
                outcome = self.optimizer_step(progress.step, batches)
                loss, grad_norm, bad = outcome.loss, outcome.grad_norm, outcome.skipped
                progress.step += 1
                progress.consumed_samples += t.global_batch_size
                window_steps += 1
                progress.train_losses.append(loss)
                stop = guard.record(bad)
                progress.skipped_steps += int(bad)
                if bad:
                    logger.message(f"step {progress.step}: non-finite loss or gradients (loss {loss}, grad norm "
                                   f"{grad_norm}); update skipped ({guard.consecutive} in a row)")
                # Every rank asks every step, so all stop after the same one.
                progress.preempted = self.preemption.agreed() and progress.step < last_step
                logger.advance()
                if progress.step % cfg.log.interval == 0 or progress.step == last_step or progress.preempted:
                    now = time.perf_counter()
                    tokens_per_s = window_steps * self.tokens_per_step / max(now - window_start, 1e-9)
                    remaining = (last_step - progress.step) * (now - window_start) / window_steps
                    logger.log_train(self._train_record(progress, loss, grad_norm, tokens_per_s, now - run_start),
                                     eta_s=remaining)
                    window_start, window_steps = now, 0
                if stop:
                    kept = self._save(progress, diverged=True)
                    raise TrainingDiverged(
                        f"{guard.consecutive} consecutive steps with non-finite loss or gradients (train.max_bad_steps="
                        f"{t.max_bad_steps}) at step {progress.step}; the weights at the stop are saved as {kept} in "
                        f"{self.ckpt_dir} for inspection. Lower train.lr or raise train.warmup_steps, then "
                        f"{self._restart_advice()}")
                at_end = progress.step == last_step
                if (t.eval_interval and progress.step % t.eval_interval == 0) or at_end:
                    progress.last_eval = self.evaluate()
                    if progress.last_eval is not None:
                        logger.log_eval({**self._counters(progress), **progress.last_eval})
                periodic = t.save_interval and progress.step % t.save_interval == 0
                if periodic and guard.consecutive and not (at_end or progress.preempted):
                    # The pointer must keep naming a checkpoint from before the streak, should it become a divergence.
                    logger.message(f"step {progress.step}: checkpoint postponed while steps are non-finite")
                elif periodic or at_end or progress.preempted:
                    self._save(progress)
                if progress.preempted:
                    logger.message(f"stopped by SIGTERM after step {progress.step} of {last_step}; a resume "
                                   f"(train.resume=true) continues from {self._resume_point()}")
                    break
        finally:
            logger.close()
        if self.is_writer and not progress.preempted:  # preempted: the scheduler's kill is coming, exit now
            plot_loss_curve(t.out_dir)
        return self._summary(progress, start_step)

    def _counters(self, progress: Progress) -> dict[str, Any]:
        # From the samples consumed, so a resume with another global batch size continues the columns.
        tokens = progress.consumed_samples * self.cfg.model.seq_len
        return {"step": progress.step, "tokens": tokens, "flops": tokens * self.flops_per_token}

    def _train_record(self, progress: Progress, loss: float, grad_norm: Optional[float], tokens_per_s: float,
                      elapsed: float) -> dict[str, Any]:
        return {**self._counters(progress), "loss": loss if math.isfinite(loss) else None,
                "lr": base_lr(progress.step - 1, self.cfg.train),
                "grad_norm": grad_norm if is_finite(grad_norm) else None, "tokens_per_s": tokens_per_s,
                "mfu": mfu(tokens_per_s, self.flops_per_token, self.world_size, self.peak.flops), "time_s": elapsed,
                "skipped_steps": progress.skipped_steps}

    def _summary(self, progress: Progress, start_step: int) -> dict[str, Any]:
        evaluation = progress.last_eval or {}
        return {**self._counters(progress), "run_dir": self.cfg.train.out_dir, "start_step": start_step,
                "train_losses": progress.train_losses,
                "final_loss": progress.train_losses[-1] if progress.train_losses else None,
                "val_loss": evaluation.get("val_loss"), "val_bpb": evaluation.get("val_bpb"),
                "skipped_steps": progress.skipped_steps, "preempted": progress.preempted}


def train(cfg: Config) -> dict[str, Any]:
    """Train per `cfg` on this rank; returns a summary (steps, tokens, flops, losses, val_loss, skipped_steps,
    preempted)."""
    return Trainer(cfg).run()
