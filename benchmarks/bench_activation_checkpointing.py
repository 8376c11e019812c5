"""Activation checkpointing: memory kept for backward, peak memory and step time of
`train.activation_checkpointing` none / selective / full on one shape, side by side as ratios to none.

    python benchmarks/bench_activation_checkpointing.py [--shape medium] [--steps 3] [--rounds 3]

One process, TP=1, the model alone (forward, backward, AdamW; no DeepSpeed) on random tokens.
- "kept for backward": the bytes of every activation autograd holds when the forward ends (parameters
  excluded; each storage counted once), read through `torch.autograd.graph.saved_tensors_hooks`. It is
  exact and the same on every device; it leaves out the recomputation's transient (one block at most).
- "peak over the step": on CUDA torch's peak allocated bytes during one step, above what was allocated
  before it; on CPU the peak resident set size (VmHWM, reset through /proc/self/clear_refs) of a fresh
  process's first step, above its size before the step, which allocator caching and page reuse blur.
- step time: the best of interleaved rounds, since other jobs may share the cores.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import time

import torch

from megamu import runtime
from megamu.config import Config, load_config
from megamu.model import build_model

MODES = ("none", "selective", "full")
SHAPES = {
    "small": ["model.hidden_size=64", "model.n_layers=2", "model.n_heads=4", "model.seq_len=64"],
    "medium": ["model.hidden_size=512", "model.n_layers=4", "model.n_heads=8", "model.seq_len=512"],
    "1b": ["model.hidden_size=2048", "model.n_layers=16", "model.n_heads=16", "model.seq_len=2048"],  # for GPUs
}
MIB = 2 ** 20


def shape_config(args: argparse.Namespace, mode: str) -> Config:
    cfg = load_config(None, SHAPES[args.shape] + [
        f"model.vocab_size={args.vocab}", f"model.dropout={args.dropout}", f"train.micro_batch_size={args.micro_batch}",
        f"train.activation_checkpointing={mode}", "mup.zero_readout=false"])
    cfg.validate(world_size=1, check_files=False)
    return cfg


class Trainee:
    """One mode's model, optimizer and a fixed batch of random tokens on the device."""

    def __init__(self, args: argparse.Namespace, mode: str, device: torch.device) -> None:
        cfg = shape_config(args, mode)
        torch.manual_seed(0)
        self.model = build_model(cfg).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.tokens = torch.randint(0, args.vocab, (args.micro_batch, cfg.model.seq_len + 1),
                                    generator=torch.Generator().manual_seed(1)).to(device)
        self.dtype = torch.bfloat16 if device.type == "cuda" or args.bf16 else torch.float32

    def forward(self) -> torch.Tensor:
        with torch.autocast(self.tokens.device.type, self.dtype, enabled=self.dtype != torch.float32):
            return self.model(self.tokens[:, :-1], labels=self.tokens[:, 1:])

    def step(self) -> None:
        self.forward().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def kept_for_backward(self) -> int:
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        kept: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = self.forward()
        loss.backward()
        self.model.zero_grad(set_to_none=True)
        return sum(kept.values())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _cpu_peak_child(args: argparse.Namespace, mode: str, results: mp.Queue) -> None:
    torch.set_num_threads(args.threads)
    trainee = Trainee(args, mode, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak resident set) to the current resident set
    before = _status_kib("VmRSS")
    trainee.step()
    results.put((_status_kib("VmHWM") - before) * 1024)


def peak_over_step(args: argparse.Namespace, mode: str, device: torch.device) -> int:
    if device.type == "cuda":
        trainee = Trainee(args, mode, device)
        trainee.step()  # optimizer state exists from here on, as in training
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainee.step()
        return torch.cuda.max_memory_allocated() - before
    ctx = mp.get_context("fork")  # the parent has run no torch work yet: a fresh heap for every mode
    results = ctx.Queue()
    child = ctx.Process(target=_cpu_peak_child, args=(args, mode, results))
    child.start()
    peak = results.get(timeout=600)
    child.join()
    return peak


def best_step_seconds(trainees: dict[str, Trainee], args: argparse.Namespace, device: torch.device) -> dict:
    for trainee in trainees.values():
        for _ in range(args.warmup):
            trainee.step()
    best = {mode: float("inf") for mode in trainees}
    for _ in range(args.rounds):
        for mode, trainee in trainees.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                trainee.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[mode] = min(best[mode], (time.perf_counter() - start) / args.steps)
    return best


def report(args: argparse.Namespace) -> str:
    device = runtime.device()
    peaks = {mode: peak_over_step(args, mode, device) for mode in MODES}
    torch.set_num_threads(args.threads)
    trainees = {mode: Trainee(args, mode, device) for mode in MODES}
    kept = {mode: trainee.kept_for_backward() for mode, trainee in trainees.items()}
    seconds = best_step_seconds(trainees, args, device)
    on_gpu = device.type == "cuda"
    precision = "bf16 autocast" if on_gpu or args.bf16 else "fp32"
    where = torch.cuda.get_device_name() if on_gpu else f"{platform.machine()}, {os.cpu_count()} CPU cores, " \
                                                        f"{args.threads} thread(s)"
    load = os.getloadavg()[0]
    header = (f"{datetime.date.today()}, {where}, torch {torch.__version__}, {precision}, load average {load:.1f} "
              f"at the end. Shape {args.shape} = {' '.join(SHAPES[args.shape])}, micro batch {args.micro_batch}, "
              f"vocab {args.vocab}, dropout {args.dropout}; best of {args.rounds} rounds of {args.steps} steps "
              f"after {args.warmup} warm-up steps.")
    peak_kind = "allocated" if on_gpu else "RSS"
    lines = [header, "", f"| mode | kept for backward (MiB) | vs none | peak over the step (MiB, {peak_kind}) "
             f"| vs none | step time (s) | vs none |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode in MODES:
        cells = [f"{figures[mode] / unit:,.{digits}f} | {figures[mode] / figures['none']:.2f}x"
                 for figures, unit, digits in ((kept, MIB, 1), (peaks, MIB, 1), (seconds, 1, 3))]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="medium", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (random tokens)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (always on CUDA): the kept "
                                                            "bytes of a GPU run, at CPU speed")
    print(report(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
