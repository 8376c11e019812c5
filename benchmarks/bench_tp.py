"""Tensor parallelism: throughput of TP=2 on 2 processes vs TP=1, and the share of time in communication;
`--tp1-overhead`: the TP code path at TP=1 vs the same model built from plain torch layers.

    python benchmarks/bench_tp.py [--shapes small,medium] [--steps 5] [--rounds 3] [--append BENCHMARKS.md]
    python benchmarks/bench_tp.py --tp1-overhead [--shapes ...] [--append BENCHMARKS.md]

Each variant trains the same model (random tokens, forward + backward + AdamW; no DeepSpeed, so only
TP itself is measured) for `steps` steps per round, and the best round is kept, since other jobs may
share the cores (the --tp1-overhead variants alternate round by round). Communication time is the wall time spent inside the TP collectives
(every all-reduce / all-gather / reduce-scatter of megamu.parallel.mappings and the vocab-parallel
cross entropy, timed by wrapping them); on CPU gloo they are synchronous, so it includes waiting for
the slower rank. TP=1 runs on one process with 1 and with 2 threads (the same two cores TP=2 uses).
TP>1 on GPUs needs one GPU per rank (NCCL); with fewer, the TP ranks run on CPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megamu import runtime
from megamu.config import Config, load_config

SECTION = "## Tensor parallelism (issue 5)"
SHAPES = {
    "small": ["model.hidden_size=256", "model.n_layers=4", "model.n_heads=8", "model.seq_len=256"],
    "medium": ["model.hidden_size=512", "model.n_layers=4", "model.n_heads=8", "model.seq_len=512"],
}


def shape_config(shape: str, tp: int, sequence_parallel: bool, vocab: int, micro_batch: int) -> Config:
    cfg = load_config(None, SHAPES[shape] + [f"model.vocab_size={vocab}", f"parallel.tensor={tp}",
                                             f"parallel.sequence_parallel={str(sequence_parallel).lower()}",
                                             f"train.micro_batch_size={micro_batch}", "mup.zero_readout=false"])
    cfg.validate(world_size=tp, check_files=False)
    return cfg


def device_for(tp: int) -> torch.device:
    if runtime.on_cuda() and torch.cuda.device_count() >= tp:
        return runtime.device()
    return torch.device("cpu")


def token_batches(cfg: Config, dev: torch.device) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)  # every TP rank must see the same tokens
    while True:
        yield torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len + 1),
                            generator=gen).to(dev)


# ---- communication timing ---------------------------------------------------------------------

class CommTimer:
    """Wall seconds spent inside the TP collectives, by wrapping the functions that issue them."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._restore: list[tuple[object, str, Callable]] = []

    def install(self) -> None:
        from megamu.parallel import cross_entropy, mappings

        for module, name in ((mappings, "_all_reduce"), (mappings, "_all_gather"), (mappings, "_reduce_scatter"),
                             (cross_entropy, "_all_reduce_")):
            original = getattr(module, name)
            setattr(module, name, self._timed(original))
            self._restore.append((module, name, original))

    def uninstall(self) -> None:
        for module, name, original in self._restore:
            setattr(module, name, original)
        self._restore.clear()

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out
        return timed


# ---- the two models -----------------------------------------------------------------------------

class PlainReadout(nn.Module):
    """The readout as nn.Linear and F.cross_entropy on the true vocabulary: what TP=1 should cost."""

    def __init__(self, weight: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.size(1), weight.size(0), bias=False)
        self.linear.weight = nn.Parameter(weight.detach().clone())
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.logit_scale

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
        return F.cross_entropy(logits[..., :vocab_size].float().reshape(-1, vocab_size), labels.reshape(-1))


def plain_copy(model: nn.Module) -> nn.Module:
    """`model` (TP=1) with every parallel layer swapped for its plain torch equivalent, same weights."""
    import copy

    from megamu.parallel.layers import (ColumnParallelLinear, ParallelReadout, RowParallelLinear,
                                        TensorParallelInput, VocabParallelEmbedding)

    plain = copy.deepcopy(model)

    def linear(layer: nn.Module) -> nn.Linear:
        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        out.weight = nn.Parameter(layer.weight.detach().clone())
        if layer.bias is not None:
            out.bias = nn.Parameter(layer.bias.detach().clone())
        return out

    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
                setattr(parent, name, linear(child))
            elif isinstance(child, VocabParallelEmbedding):
                setattr(parent, name, nn.Embedding.from_pretrained(child.weight.detach().clone(), freeze=False))
            elif isinstance(child, TensorParallelInput):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, ParallelReadout):
                setattr(parent, name, PlainReadout(child.weight, child.logit_mult))
    return plain


def training_step(model: nn.Module, cfg: Config, dev: torch.device) -> Callable[[], None]:
    model.to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = token_batches(cfg, dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step() -> None:
        tokens = next(batches)
        with autocast:
            loss = model(tokens[:, :-1], labels=tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return step


@dataclass
class Timing:
    tokens_per_s: float
    comm_share: float


def measure(step: Callable[[], None], steps: int, tokens_per_step: int, timer: Optional[CommTimer],
            group: Optional[dist.ProcessGroup]) -> Timing:
    sync = torch.cuda.synchronize if runtime.on_cuda() else (lambda: None)
    if group is not None:
        dist.barrier(group)
    sync()
    comm_before = timer.seconds if timer else 0.0
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = time.perf_counter() - start
    comm = (timer.seconds - comm_before) if timer else 0.0
    return Timing(steps * tokens_per_step / wall, comm / wall)


# ---- TP=k on k processes ------------------------------------------------------------------------

def _tp_worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dev = device_for(world)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    from megamu.model import build_model

    results = {}
    timer = CommTimer()
    timer.install()
    for shape in args.shapes.split(","):
        for sp in (False, True):
            cfg = shape_config(shape, world, sp, args.vocab, args.micro_batch)
            step = training_step(build_model(cfg, dist.group.WORLD), cfg, dev)
            for _ in range(args.warmup):
                step()
            best = None
            for _ in range(args.rounds):
                t = measure(step, args.steps, cfg.train.micro_batch_size * cfg.model.seq_len, timer, dist.group.WORLD)
                best = t if best is None or t.tokens_per_s > best.tokens_per_s else best
            results[(shape, sp)] = best
    timer.uninstall()
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def run_tp(args: argparse.Namespace) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tp_worker, args=(rank, args.tp, port, args, queue)) for rank in range(args.tp)]
    for p in procs:
        p.start()
    results = queue.get()
    for p in procs:
        p.join()
    return results


def run_tp1(args: argparse.Namespace, shape: str, threads: int) -> Timing:
    from megamu.model import build_model

    torch.set_num_threads(threads)
    cfg = shape_config(shape, 1, False, args.vocab, args.micro_batch)
    step = training_step(build_model(cfg), cfg, device_for(1))
    for _ in range(args.warmup):
        step()
    return max((measure(step, args.steps, cfg.train.micro_batch_size * cfg.model.seq_len, None, None)
                for _ in range(args.rounds)), key=lambda t: t.tokens_per_s)


def tp_report(args: argparse.Namespace) -> str:
    tp = run_tp(args)
    lines = [_header(args, "python benchmarks/bench_tp.py"), "",
             "| shape | variant | processes × threads | tokens/s | vs TP=1 (1 thread) | time in TP communication |",
             "| --- | --- | --- | --- | --- | --- |"]
    for shape in args.shapes.split(","):
        one = run_tp1(args, shape, 1)
        two_threads = run_tp1(args, shape, args.tp)
        rows = [("TP=1", "1 × 1", one), ("TP=1", f"1 × {args.tp}", two_threads),
                (f"TP={args.tp}", f"{args.tp} × 1", tp[(shape, False)]),
                (f"TP={args.tp} + SP", f"{args.tp} × 1", tp[(shape, True)])]
        for variant, layout, t in rows:
            comm = f"{t.comm_share:.0%}" if variant != "TP=1" else "-"
            lines.append(f"| {shape} | {variant} | {layout} | {t.tokens_per_s:,.0f} | "
                         f"{t.tokens_per_s / one.tokens_per_s:.2f}x | {comm} |")
    return "\n".join(lines) + "\n"


# ---- TP=1 code path vs plain torch layers -------------------------------------------------------

def overhead_report(args: argparse.Namespace) -> str:
    from megamu.model import build_model

    lines = [_header(args, "python benchmarks/bench_tp.py --tp1-overhead"), "",
             "One process" + (", 1 thread." if not runtime.on_cuda() else "."), "",
             "| shape | model | tokens/s | TP=1 code-path overhead |", "| --- | --- | --- | --- |"]
    dev = device_for(1)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # two threads on shared cores make the two variants' timings swing apart
    for shape in args.shapes.split(","):
        cfg = shape_config(shape, 1, False, args.vocab, args.micro_batch)
        torch.manual_seed(0)
        megamu_model = build_model(cfg)
        variants = {"plain torch layers": training_step(plain_copy(megamu_model), cfg, dev),
                    "megamu TP layers at TP=1": training_step(megamu_model, cfg, dev)}
        best: dict[str, Timing] = {}
        for step in variants.values():
            for _ in range(args.warmup):
                step()
        for _ in range(args.rounds):  # interleaved
            for name, step in variants.items():
                t = measure(step, args.steps, cfg.train.micro_batch_size * cfg.model.seq_len, None, None)
                if name not in best or t.tokens_per_s > best[name].tokens_per_s:
                    best[name] = t
        plain = best["plain torch layers"].tokens_per_s
        for name, t in best.items():
            overhead = f"{plain / t.tokens_per_s - 1:+.1%}" if name != "plain torch layers" else "-"
            lines.append(f"| {shape} | {name} | {t.tokens_per_s:,.0f} | {overhead} |")
    return "\n".join(lines) + "\n"


def _header(args: argparse.Namespace, command: str) -> str:
    on_gpu = runtime.on_cuda()
    dev = torch.cuda.get_device_name() if on_gpu else f"{platform.processor() or platform.machine()}, " \
                                                      f"{os.cpu_count()} CPU cores"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{datetime.date.today()}, {dev}, torch {torch.__version__}, {'bf16 autocast' if on_gpu else 'fp32'}, "
            f"load average {load:.1f} at the end. Best of {args.rounds} rounds of {args.steps} steps after "
            f"{args.warmup} warm-up steps; micro batch {args.micro_batch}, random tokens, vocab {args.vocab}; "
            f"shapes: " + "; ".join(f"{s} = {' '.join(SHAPES[s])}" for s in args.shapes.split(",")) +
            f". Reproduce: `{command}`.")


def append_section(path: str, subsection: str, body: str) -> None:
    """Write `body` under `### subsection` of this benchmark's section, leaving everything else alone."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n"
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end == -1 else end + 1
    section = text[start:end].rstrip("\n") + "\n"
    heading = f"### {subsection}"
    if heading in section:
        sub_start = section.index(heading)
        sub_end = section.find("\n### ", sub_start + len(heading))
        section = section[:sub_start] + (section[sub_end + 1:] if sub_end != -1 else "")
    section = section.rstrip("\n") + f"\n\n{heading}\n\n{body}"
    tail = text[end:]
    with open(path, "w") as f:
        f.write(text[:start] + section + ("\n" + tail if tail else ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp1-overhead", action="store_true",
                        help="measure the TP=1 code path against plain torch layers (one process)")
    parser.add_argument("--tp", type=int, default=2, help="TP size of the parallel run (that many processes)")
    parser.add_argument("--shapes", default="small,medium", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (random tokens)")
    parser.add_argument("--append", metavar="BENCHMARKS.md", help="write the table into this file's section")
    args = parser.parse_args(argv)
    if args.tp1_overhead:
        body, subsection = overhead_report(args), "TP=1 code path vs plain torch layers"
    else:
        body, subsection = tp_report(args), f"TP={args.tp} vs TP=1"
    print(body)
    if args.append:
        append_section(args.append, subsection, body)


if __name__ == "__main__":
    main()
