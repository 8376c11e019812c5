"""Training throughput: megamu's DeepSpeed engine vs a plain PyTorch loop over the same model vs
HF transformers' LlamaForCausalLM of the same shape, side by side in one process.

    python benchmarks/bench_train.py [--shapes tiny,20m] [--steps 5] [--rounds 3] [--append BENCHMARKS.md]

All train on the same random token batches with AdamW, gradient clipping and the same
micro/global batch. The engine runs megamu's real step (LR schedule, non-finite guard, loss
all-reduce) under ZeRO 0 (megamu's default at one data-parallel rank) and under ZeRO 1; the plain
loop is what the engine should cost nothing over.
Rounds are interleaved and the best is kept, since other jobs may share the cores. CPU: fp32;
CUDA: bf16 (DeepSpeed bf16 for megamu, autocast for the other two) with MFU against the GPU's peak (megamu.runtime).
Needs `pip install -e .[bench]` (transformers).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megamu import runtime
from megamu.config import Config, load_config
from megamu.shipped import DEEPSPEED, shipped_path

SECTION = "## Training throughput (issue 3)"
ZERO0, ZERO1 = "megamu engine, ZeRO 0 (default at DP=1)", "megamu engine, ZeRO 1"
# The shipped tiny config as is, and a ~20M-parameter shape on the same recipe.
SHAPES = {
    "tiny": [],
    "20m": ["model.hidden_size=384", "model.n_layers=8", "model.n_heads=6", "model.n_kv_heads=6",
            "model.seq_len=256", "mup.base_hidden_size=128"],
}


@dataclass
class Result:
    tokens_per_s: float
    cpu_ms_per_ktok: float


def shape_config(shape: str, vocab_size: int) -> Config:
    cfg = load_config(shipped_path("tiny"),
                      SHAPES[shape] + [f"model.vocab_size={vocab_size}", "train.warmup_steps=1",
                                       "train.max_steps=1000", "train.deepspeed_config=null"])
    cfg.validate(world_size=1, check_files=False)
    return cfg


def token_batches(cfg: Config, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless micro batches [micro, seq_len + 1] of random tokens (throughput does not depend on them)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.train.micro_batch_size, cfg.model.seq_len + 1)
    while True:
        yield torch.randint(0, cfg.model.vocab_size, shape, generator=gen)


def megamu_step(cfg: Config, ds_name: str) -> Callable[[int], None]:
    import copy

    from megamu.parallel import initialize_parallel
    from megamu.training.ds_config import build_ds_config
    from megamu.training.engine import build_engine

    cfg = copy.deepcopy(cfg)
    cfg.train.deepspeed_config = shipped_path(ds_name, DEEPSPEED)
    state = initialize_parallel()
    optimizer_step = build_engine(cfg, build_ds_config(cfg, dp_size=1), state)
    batches = token_batches(cfg)
    return lambda step: optimizer_step(step, batches)


def _plain_loop(model: torch.nn.Module, groups: list[dict], cfg: Config,
                loss_of: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]) -> Callable[[int], None]:
    from megamu.training.schedule import apply_lr, base_lr

    t = cfg.train
    dev = runtime.device()
    model.to(dev).train()
    fused = {"fused": True} if dev.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, **fused)
    accumulation = t.global_batch_size // t.micro_batch_size
    batches = token_batches(cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step(i: int) -> None:
        apply_lr(optimizer.param_groups, base_lr(i, t))
        for _ in range(accumulation):
            tokens = next(batches).to(dev, non_blocking=True)
            with autocast:
                loss = loss_of(model, tokens) / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the engine syncs on the loss each step too
    return step


def plain_step(cfg: Config) -> Callable[[int], None]:
    from megamu.model import build_model, mup

    model = build_model(cfg)
    return _plain_loop(model, mup.param_groups(model, cfg), cfg,
                       lambda m, tokens: m(tokens[:, :-1], labels=tokens[:, 1:]))


def hf_step(cfg: Config) -> Callable[[int], None]:
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
    # HF shifts labels inside; the same T tokens in and T predictions out as megamu's model.
    return _plain_loop(model, groups, cfg, lambda mod, tokens: mod(input_ids=tokens[:, :-1],
                                                                   labels=tokens[:, :-1]).loss)


def measure(step: Callable[[int], None], cfg: Config, start: int, steps: int) -> Result:
    sync = torch.cuda.synchronize if runtime.on_cuda() else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(start, start + steps):
        step(i)
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = steps * cfg.train.global_batch_size * cfg.model.seq_len
    return Result(tokens / wall, 1e6 * cpu / tokens)


def bench_shape(shape: str, steps: int, rounds: int, warmup: int, vocab: int) -> dict:
    from megamu.model import flops_per_token, param_counts

    cfg = shape_config(shape, vocab)
    torch.manual_seed(0)
    variants = {ZERO0: megamu_step(cfg, "zero0"), ZERO1: megamu_step(cfg, "zero1"),
                "plain PyTorch": plain_step(cfg), "HF Llama": hf_step(cfg)}
    done = dict.fromkeys(variants, 0)
    for name, step in variants.items():
        measure(step, cfg, 0, warmup)
        done[name] = warmup
    best: dict[str, Result] = {}
    for _ in range(rounds):  # interleaved, so a burst of load from other jobs hits every variant
        for name, step in variants.items():
            result = measure(step, cfg, done[name], steps)
            done[name] += steps
            if name not in best or result.tokens_per_s > best[name].tokens_per_s:
                best[name] = result
    return {"shape": shape, "cfg": cfg, "params": param_counts(cfg)["total"],
            "flops_per_token": flops_per_token(cfg), "best": best}


def report(results: list[dict], args: argparse.Namespace) -> str:
    on_gpu = runtime.on_cuda()
    dev = torch.cuda.get_device_name() if on_gpu else f"{platform.processor() or platform.machine()}, " \
                                                      f"{os.cpu_count()} CPU cores"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"{datetime.date.today()}, {dev}, torch {torch.__version__}, {'bf16' if on_gpu else 'fp32'}, "
             f"load average {load:.1f} at the end. Best of {args.rounds} interleaved rounds of {args.steps} steps "
             f"after {args.warmup} warm-up steps; random tokens, vocab {args.vocab}. "
             f"Reproduce: `python benchmarks/bench_train.py`.", "",
             "| shape | params | tokens/step | variant | tokens/s | CPU-ms / 1k tokens |"
             + (" MFU |" if on_gpu else ""),
             "| --- | --- | --- | --- | --- | --- |" + (" --- |" if on_gpu else "")]
    summary = []
    peak = runtime.peak_flops("bf16").flops if on_gpu else None
    for r in results:
        cfg = r["cfg"]
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
        for name, res in r["best"].items():
            mfu = f" {res.tokens_per_s * r['flops_per_token'] / peak:.1%} |" if on_gpu else ""
            lines.append(f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {tokens_per_step} | {name} | "
                         f"{res.tokens_per_s:,.0f} | {res.cpu_ms_per_ktok:.0f} |{mfu}")
        b = r["best"]
        for engine in (ZERO0, ZERO1):
            overhead = 1 - b[engine].tokens_per_s / b["plain PyTorch"].tokens_per_s
            versus_hf = b[engine].tokens_per_s / b["HF Llama"].tokens_per_s
            summary.append(f"- {r['shape']}, {engine}: engine overhead vs plain loop {overhead:+.1%} (goal <= 5%); "
                           f"megamu / HF Llama throughput {versus_hf:.2f}x (goal >= 1)")
    return "\n".join(lines + [""] + summary) + "\n"


def append_section(path: str, body: str) -> None:
    """Replace (or add) this benchmark's section in BENCHMARKS.md, leaving other sections alone."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + text[nxt + 1:] if nxt != -1 else text[:start]
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + f"\n\n{SECTION}\n\n{body}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,20m", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (random tokens)")
    parser.add_argument("--append", metavar="BENCHMARKS.md", help="write the table into this file's section")
    args = parser.parse_args(argv)
    results = [bench_shape(s, args.steps, args.rounds, args.warmup, args.vocab) for s in args.shapes.split(",")]
    body = report(results, args)
    print(body)
    if args.append:
        append_section(args.append, body)


if __name__ == "__main__":
    main()
