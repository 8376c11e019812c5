"""MFU and step split: megamu's DeepSpeed engine step vs HF transformers' LlamaForCausalLM of the same
shape vs a plain PyTorch loop over megamu's model, side by side in one process.

    python benchmarks/bench_mfu.py [--config tiny] [--shapes tiny,20m] [--steps 5] [--rounds 3]
        [--dtype fp32|bf16] [--fused-ce on|off] [--compile on|off] [--append BENCHMARKS.md] [key=value ...]

All three train on the same random token batches with AdamW, gradient clipping and the config's
micro/global batch. "megamu engine" is megamu's real optimizer step (LR schedule, loss all-reduce,
global grad norm, non-finite gate) on the DeepSpeed engine with the config's ZeRO stage (0 at one rank
unless the config names a json); "plain loop" is a hand-written loop over the same megamu model, the
cost the engine should add nothing to; "HF Llama" is LlamaForCausalLM with the same vocabulary,
width, depth, heads, kv heads, MLP width, RoPE θ and untied embeddings, in the same loop.
`--dtype bf16` runs DeepSpeed's bf16 mode for the engine and bf16 autocast for the other two.
`--fused-ce` and `--compile` set train.fused_cross_entropy and train.compile (megamu's model, in the
engine and the plain loop); `--compile on` also compiles the whole HF model, as the engine compiles
its whole module. Trailing key=value arguments override the config (after the shape and the options).

Columns:
- tokens/s and step ms: the best of the interleaved rounds (other jobs may share the machine);
  TFLOP/s = megamu.model.flops_per_token × tokens/s (the same model FLOPs for all three); MFU = that
  over megamu.runtime.peak_flops (a known GPU's dense bf16 peak, else a timed square matmul in the
  run's dtype on the same device, so on a CPU it reads "fraction of what these cores can multiply"; read
  before the first round and after every round, the best reading kept).
- memory: state (weights, gradients kept between steps, optimizer state: growth from building the
  implementation and its warm-up) + step (the peak growth during a step over the memory before it:
  activations, gradients, logits). CUDA: torch.cuda.memory_allocated / max_memory_allocated. CPU:
  resident set size from /proc (Linux); glibc keeps freed memory mapped for reuse, so every reading
  follows malloc_trim(0) (freed pages are handed back and count again when reused) and the step's peak
  is VmHWM after resetting it through /proc/self/clear_refs. Tracemalloc cannot be used: it sees
  Python's allocations, not torch's.
- step split: the fastest round, timed phase by phase (on a GPU: one more round with the device
  synchronised around every phase, since the throughput rounds run without these syncs): data (drawing
  the batch and moving it to the device), forward, backward, optimizer (DeepSpeed's engine.step, or
  clipping + AdamW + zeroing grads) and other (the rest of the step: the engine's loss all-reduce, its
  grad norm for the non-finite gate, the LR schedule).
- where the time goes (MFU < 1): torch.profiler over one step, the operators' self time (CUDA: device
  time) as a share of the step: matrix multiplies (mm/addmm/bmm and their backward), fused attention,
  every other operator (norms, activations, RoPE, softmax/cross entropy, AdamW, copies: memory bound,
  far below the matmul peak), and outside operators (Python, dispatch, autograd bookkeeping; on a GPU
  the time it sits idle). Even the matmuls run below the peak: the model's are smaller and skinnier
  than the peak's square one.
Needs `pip install -e .[bench]` (transformers).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from megamu import runtime
from megamu.config import Config, load_config, resolve
from megamu.shipped import resolve_config

SECTION = "## MFU and step split (issue 11)"
ENGINE, PLAIN, HF = "megamu engine", "plain loop", "HF Llama"
PHASES = ("data", "forward", "backward", "optimizer")
# Model shapes applied over the config: "config" keeps the config's own; "tiny" is configs/tiny.yaml's
# model; "20m" a ~20M-parameter model (at vocab 8192) on the same μP base width.
SHAPES = {
    "config": [],
    "tiny": ["model.hidden_size=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
             "model.seq_len=128", "mup.base_hidden_size=128"],
    "20m": ["model.hidden_size=384", "model.n_layers=8", "model.n_heads=6", "model.n_kv_heads=6",
            "model.seq_len=256", "mup.base_hidden_size=128"],
}
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv"}
MIB = 2**20


# ---- timing and memory -------------------------------------------------------------------------------

def sync() -> None:
    if runtime.on_cuda():
        torch.cuda.synchronize()


class PhaseTimer:
    """Wall time per phase of a step, while `active`; syncs the device around each phase so that GPU work
    lands in the phase that queued it (inactive, it adds a Python call and nothing else)."""

    def __init__(self) -> None:
        self.active = False
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.seconds[phase] += time.perf_counter() - start

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self(phase):
                return fn(*args, **kwargs)
        return timed


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1])


def _release_freed_memory() -> None:
    """Hand glibc's cached free pages back to the OS, so RSS counts only live memory and a reuse counts again."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_now() -> Optional[int]:
    """Bytes in use: allocated on CUDA, resident on the CPU (None where /proc is missing)."""
    if runtime.on_cuda():
        return torch.cuda.memory_allocated()
    _release_freed_memory()
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_memory_peak() -> Optional[int]:
    """Start a new peak; returns memory_now()."""
    now = memory_now()
    if runtime.on_cuda():
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current RSS
    return now


def memory_peak() -> Optional[int]:
    if runtime.on_cuda():
        return torch.cuda.max_memory_allocated()
    kib = _proc_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def _growth(after: Optional[int], before: Optional[int]) -> Optional[int]:
    return None if after is None or before is None else max(after - before, 0)


# ---- the three implementations -------------------------------------------------------------------------

@dataclass
class Implementation:
    name: str
    step: Callable[[int], None]  # optimizer step i (0-based) over one global batch
    timer: PhaseTimer
    state_bytes: Optional[int] = None
    done: int = 0  # steps taken so far, so the LR schedule keeps advancing


def timed_batches(cfg: Config, timer: PhaseTimer, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless micro batches [micro, seq_len + 1] of random tokens on the device (throughput does not
    depend on them), drawn inside the data phase."""
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.train.micro_batch_size, cfg.model.seq_len + 1)
    pin, dev = runtime.pin_memory(), runtime.device()
    while True:
        with timer("data"):
            tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
            tokens = (tokens.pin_memory() if pin else tokens).to(dev, non_blocking=True)
        yield tokens


def engine_step(cfg: Config, timer: PhaseTimer) -> tuple[str, Callable[[int], None]]:
    from megamu.parallel import initialize_parallel
    from megamu.training.ds_config import build_ds_config
    from megamu.training.engine import build_engine

    optimizer_step = build_engine(cfg, build_ds_config(cfg, dp_size=1), initialize_parallel())
    engine = optimizer_step.engine
    # Instance attributes shadow the methods OptimizerStep calls (nn.Module.__call__ looks up self.forward).
    engine.forward = timer.wrap("forward", engine.forward)
    engine.backward = timer.wrap("backward", engine.backward)
    engine.step = timer.wrap("optimizer", engine.step)
    batches = timed_batches(cfg, timer)
    name = f"{ENGINE} (ZeRO {optimizer_step.zero_stage})"
    return name, lambda i: optimizer_step(i, batches)


def loop_step(model: torch.nn.Module, groups: list[dict], cfg: Config, timer: PhaseTimer,
              loss_of: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]) -> Callable[[int], None]:
    """A minimal training loop: the engine's step without DeepSpeed or megamu's guards."""
    from megamu.training.schedule import apply_lr, base_lr

    t, dev = cfg.train, runtime.device()
    model.to(dev).train()
    if t.compile:
        model.compile()
    fused = {"fused": True} if runtime.fused_adamw() else {}
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay, **fused)
    accumulation = t.global_batch_size // t.micro_batch_size
    batches = timed_batches(cfg, timer)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=runtime.train_dtype(t.dtype) == "bf16")

    def step(i: int) -> None:
        apply_lr(optimizer.param_groups, base_lr(i, t))
        for _ in range(accumulation):
            tokens = next(batches)
            with timer("forward"), autocast:
                loss = loss_of(model, tokens) / accumulation
            with timer("backward"):
                loss.backward()
        with timer("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss.item()  # the engine syncs on the loss each step too
    return step


def plain_step(cfg: Config, timer: PhaseTimer) -> Callable[[int], None]:
    from megamu.model import build_model, mup

    model = build_model(cfg)
    return loop_step(model, mup.param_groups(model, cfg), cfg, timer,
                     lambda m, tokens: m(tokens[:, :-1], labels=tokens[:, 1:]))


def hf_mismatch(cfg: Config) -> Optional[str]:
    """Why HF's LlamaForCausalLM cannot have this config's shape, or None."""
    if cfg.model.arch != "llama":
        return f"model.arch={cfg.model.arch}"
    if cfg.model.qk_norm:
        return "model.qk_norm=true"
    return None


def hf_step(cfg: Config, timer: PhaseTimer) -> Callable[[int], None]:
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf_config = LlamaConfig(vocab_size=cfg.padded_vocab_size(), hidden_size=m.hidden_size,
                            intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=m.n_layers,
                            num_attention_heads=m.n_heads, num_key_value_heads=cfg.kv_heads,
                            max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                            tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                            attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_config)
    groups = [{"params": list(model.parameters()), "lr_mult": 1.0}]
    return loop_step(model, groups, cfg, timer, hf_loss)


def hf_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss (fp32 logits, then cross entropy) on the same T inputs and T next-token targets as
    megamu's model; HF's own `labels=` would shift inside and predict one token fewer."""
    logits = model(input_ids=tokens[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def build_implementations(cfg: Config, warmup: int) -> list[Implementation]:
    """Each implementation built and warmed up in turn, its state memory measured around that."""
    builders = [lambda timer: engine_step(cfg, timer), lambda timer: (PLAIN, plain_step(cfg, timer))]
    if hf_mismatch(cfg) is None:
        builders.append(lambda timer: (HF, hf_step(cfg, timer)))
    impls = []
    for build in builders:
        torch.manual_seed(cfg.train.seed)
        before, timer = memory_now(), PhaseTimer()
        name, step = build(timer)
        impl = Implementation(name, step, timer)
        run_steps(impl, warmup)
        impl.state_bytes = _growth(memory_now(), before)
        impls.append(impl)
    return impls


def preload() -> None:
    """Imports and process group up front, so their memory is not charged to the first implementation."""
    import deepspeed  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from megamu.parallel import initialize_parallel
    from megamu.training import engine  # noqa: F401

    initialize_parallel()


# ---- measurements ---------------------------------------------------------------------------------------

def run_steps(impl: Implementation, steps: int) -> float:
    """Seconds for `steps` optimizer steps."""
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        impl.step(impl.done)
        impl.done += 1
    sync()
    return time.perf_counter() - start


@dataclass
class Split:
    step_s: float  # per step, in the split round
    phases: dict[str, float]  # seconds per step
    step_peak_bytes: Optional[int]

    @property
    def other_s(self) -> float:
        return self.step_s - sum(self.phases.values())


def split_round(impl: Implementation, steps: int) -> Split:
    impl.timer.seconds.clear()
    impl.timer.active = True
    before = reset_memory_peak()
    seconds = run_steps(impl, steps)
    peak = _growth(memory_peak(), before)
    impl.timer.active = False
    return Split(seconds / steps, {p: impl.timer.seconds[p] / steps for p in PHASES}, peak)


@dataclass
class OpShares:
    matmul: float
    attention: float
    other_ops: float
    top_other: list[str] = field(default_factory=list)  # the largest other operators, by name

    @property
    def outside(self) -> float:
        return 1 - self.matmul - self.attention - self.other_ops


def op_kind(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    return "attention" if "scaled_dot_product" in name or "flash" in name else "other"


def op_shares(impl: Implementation) -> OpShares:
    """torch.profiler over one step: operators' self time (device time on CUDA) as shares of the step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = runtime.on_cuda()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step_us = run_steps(impl, 1) * 1e6
    by_kind: dict[str, float] = defaultdict(float)
    other: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):  # the rest (autograd nodes, annotations, CUDA kernels) nests them
            continue
        share = (event.self_device_time_total if cuda else event.self_cpu_time_total) / step_us
        by_kind[op_kind(event.key)] += share
        if op_kind(event.key) == "other":
            other[event.key.removeprefix("aten::")] += share
    top = sorted(other, key=other.get, reverse=True)[:3]
    return OpShares(by_kind["matmul"], by_kind["attention"], by_kind["other"], [f"{n} {other[n]:.0%}" for n in top])


@dataclass
class Measured:
    name: str
    step_s: float  # best round, per step
    state_bytes: Optional[int]
    split: Split
    shares: Optional[OpShares]


def fresh_peak(dtype: str) -> runtime.PeakFlops:
    """runtime.peak_flops read anew (it caches one measurement per process): a reading between rounds sees
    the load those rounds saw, and the best reading is kept like the best round (one taken during a burst of
    load from other jobs would inflate MFU)."""
    runtime.measured_peak_flops.cache_clear()
    return runtime.peak_flops(dtype)


def measure_shape(cfg: Config, args: argparse.Namespace, peaks: list[runtime.PeakFlops]) -> list[Measured]:
    impls = build_implementations(cfg, args.warmup)
    # The phase timer's syncs are no-ops on the CPU, so there every round is split and the fastest one kept;
    # on a GPU they would slow the timed rounds down, so one more round is split after them.
    split_every_round = not runtime.on_cuda()
    best = dict.fromkeys((i.name for i in impls), float("inf"))
    splits: dict[str, Split] = {}
    for _ in range(args.rounds):  # interleaved, so a burst of load from other jobs hits every implementation
        for impl in impls:
            if split_every_round:
                split = split_round(impl, args.steps)
                if impl.name not in splits or split.step_s < splits[impl.name].step_s:
                    splits[impl.name] = split
                best[impl.name] = splits[impl.name].step_s
            else:
                best[impl.name] = min(best[impl.name], run_steps(impl, args.steps) / args.steps)
        peaks.append(fresh_peak(args.dtype))
    if not split_every_round:
        splits = {impl.name: split_round(impl, args.steps) for impl in impls}
    shares = {impl.name: op_shares(impl) if args.profile else None for impl in impls}
    return [Measured(i.name, best[i.name], i.state_bytes, splits[i.name], shares[i.name]) for i in impls]


# ---- config and report ----------------------------------------------------------------------------------

def shape_config(args: argparse.Namespace, shape: str) -> Config:
    overrides = SHAPES[shape] + [f"model.vocab_size={args.vocab}", f"train.dtype={args.dtype}",
                                 f"train.fused_cross_entropy={args.fused_ce == 'on'}",
                                 f"train.compile={args.compile == 'on'}",
                                 "train.warmup_steps=1", "train.max_steps=1000000"] + args.overrides
    cfg = load_config(resolve_config(args.config), overrides)
    resolve(cfg, world_size=1, check_files=False)
    return cfg


def machine() -> str:
    if runtime.on_cuda():
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as info:
            model = next(line for line in info if line.startswith("model name")).split(":", 1)[1].strip()
            return f"{model}, {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / MIB:,.0f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def header(args: argparse.Namespace, peak: runtime.PeakFlops, readings: int, load_start: float) -> str:
    peak_source = (f"{peak.source} dense bf16" if peak.source.startswith("table:") else
                   f"measured, {args.dtype} square matmul on the {runtime.device().type}, best of {readings} readings")
    command = " ".join(["python benchmarks/bench_mfu.py", *sys.argv[1:]])
    return (f"{datetime.date.today()}, {machine()}, torch {torch.__version__}, {args.dtype}, config {args.config}, "
            f"fused CE {args.fused_ce}, compile {args.compile}; load average {load_start:.1f} at the start, "
            f"{load_average():.1f} at the end. Peak {peak.flops / 1e12:.3g} TFLOP/s ({peak_source}). Best of "
            f"{args.rounds} interleaved rounds of {args.steps} steps after {args.warmup} warm-up steps; random "
            f"tokens, vocab {args.vocab}. Reproduce: `{command}`.")


def throughput_rows(shape: str, cfg: Config, results: list[Measured], peak: float) -> list[str]:
    from megamu.model import flops_per_token, param_counts

    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    rows = []
    for r in results:
        tokens_per_s = tokens / r.step_s
        flops = tokens_per_s * flops_per_token(cfg)
        total = None if r.state_bytes is None or r.split.step_peak_bytes is None \
            else r.state_bytes + r.split.step_peak_bytes
        rows.append(f"| {shape} | {param_counts(cfg)['total'] / 1e6:.1f}M | {tokens} | {r.name} | "
                    f"{tokens_per_s:,.0f} | {_ms(r.step_s)} | {flops / 1e12:.3g} | {flops / peak:.1%} | "
                    f"{_mib(total)} ({_mib(r.state_bytes)} + {_mib(r.split.step_peak_bytes)}) |")
    return rows


def split_rows(shape: str, results: list[Measured]) -> list[str]:
    rows = []
    for r in results:
        s = r.split
        cells = [_ms(s.step_s), *(f"{_ms(s.phases[p])} ({s.phases[p] / s.step_s:.0%})" for p in PHASES),
                 f"{_ms(s.other_s)} ({s.other_s / s.step_s:.0%})"]
        rows.append(f"| {shape} | {r.name} | " + " | ".join(cells) + " |")
    return rows


def share_rows(shape: str, results: list[Measured]) -> list[str]:
    return [f"| {shape} | {r.name} | {r.shares.matmul:.0%} | {r.shares.attention:.0%} | {r.shares.other_ops:.0%} | "
            f"{r.shares.outside:.0%} | {', '.join(r.shares.top_other)} |" for r in results if r.shares]


def ratio_lines(shape: str, cfg: Config, results: list[Measured]) -> list[str]:
    by_name = {r.name.split(" (")[0]: r.step_s for r in results}
    lines = [f"- {shape}: megamu engine / plain loop tokens/s {by_name[PLAIN] / by_name[ENGINE]:.2f}x (goal >= 1)"]
    if HF in by_name:
        lines.append(f"- {shape}: megamu engine / HF Llama tokens/s {by_name[HF] / by_name[ENGINE]:.2f}x "
                     f"(goal >= 1.1)")
    else:
        lines.append(f"- {shape}: no HF Llama of this shape ({hf_mismatch(cfg)})")
    return lines


def report(measured: list[tuple[str, Config, list[Measured]]], args: argparse.Namespace,
           peak: runtime.PeakFlops, readings: int, load_start: float) -> str:
    lines = [header(args, peak, readings, load_start), "",
             "| shape | params | tokens/step | implementation | tokens/s | step ms | TFLOP/s | MFU "
             "| memory MiB (state + step) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape, cfg, results in measured:
        lines += throughput_rows(shape, cfg, results, peak.flops)
    split_round_name = "one more round, synchronised around every phase" if runtime.on_cuda() else "the fastest round"
    lines += ["", f"Step split, ms per step (share of the step), in {split_round_name}:", "",
              "| shape | implementation | step ms | data | forward | backward | optimizer | other |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape, _, results in measured:
        lines += split_rows(shape, results)
    if args.profile:
        lines += ["", "Where the step's time goes (torch.profiler, one step; operators' self time as a share of it):",
                  "", "| shape | implementation | matmul | attention | other ops | outside ops | largest other ops |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for shape, _, results in measured:
            lines += share_rows(shape, results)
    lines.append("")
    for shape, cfg, results in measured:
        lines += ratio_lines(shape, cfg, results)
    return "\n".join(lines) + "\n"


def append_section(path: str, body: str) -> None:
    """Replace (or add) this benchmark's section in BENCHMARKS.md, leaving other sections alone."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + text[nxt + 1:] if nxt != -1 else text[:start]
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + f"\n\n{SECTION}\n\n{body}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="a shipped config name or a YAML path")
    parser.add_argument("--shapes", default="tiny,20m", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (random tokens)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32" if not runtime.on_cuda() else "bf16")
    parser.add_argument("--fused-ce", choices=("on", "off"), default="on", help="train.fused_cross_entropy")
    parser.add_argument("--compile", choices=("on", "off"), default="off", help="train.compile")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="profile one step per implementation (matmul vs other operators)")
    parser.add_argument("--append", metavar="BENCHMARKS.md", help="write the report into this file's section")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.micro_batch_size=4")
    args = parser.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    load_start = load_average()
    preload()
    peaks = [fresh_peak(args.dtype)]
    measured = []
    for shape in args.shapes.split(","):
        cfg = shape_config(args, shape)
        measured.append((shape, cfg, measure_shape(cfg, args, peaks)))
    body = report(measured, args, max(peaks, key=lambda p: p.flops), len(peaks), load_start)
    print(body)
    if args.append:
        append_section(args.append, body)


if __name__ == "__main__":
    main()
