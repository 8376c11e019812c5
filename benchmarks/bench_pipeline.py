"""Pipeline bubble: tokens/s of PP=2 (DeepSpeed's 1F1B engine, two processes) against PP=1 at 1, 2, 4 and 8
micro batches per step, side by side with the 1F1B bubble (p-1)/(m+p-1).

    python benchmarks/bench_pipeline.py [--micro-batches 1,2,4,8] [--steps 8] [--hidden 256] [--layers 4]

Every run is the real trainer (`python -m megamu.train`, PP=2 launched by torchrun --standalone) on the
sample corpus, one thread per process. PP=2 halves each process's work, so with no bubble and free
communication it would reach twice the one-process PP=1 rate; its efficiency is
tokens/s(PP=2) / (2 × tokens/s(PP=1)), to be read against 1 − bubble = m / (m + p − 1). Throughput is
the median over the logged steps after the first two (start-up and allocation). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Optional

from megamu.demo import prepare_sample_data
from megamu.parallel.launch_env import without_launch_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = 2


def run(pipeline: int, micro_batches: int, args: argparse.Namespace, data, out_dir: str) -> float:
    """Median tokens/s of one trainer run; PP=1 is one process, PP>1 one process per stage."""
    overrides = [f"model.hidden_size={args.hidden}", f"model.n_layers={args.layers}", "model.n_heads=4",
                 f"model.seq_len={args.seq_len}", f"mup.base_hidden_size={args.hidden}",
                 f"parallel.pipeline={pipeline}", f"train.micro_batch_size={args.micro_batch}",
                 f"train.global_batch_size={args.micro_batch * micro_batches}", f"train.max_steps={args.steps}",
                 "train.warmup_steps=1", "train.eval_iters=0", "train.save_interval=0", "log.interval=1",
                 "log.progress_bar=false", f"data.path={data.data_prefix}",
                 f"data.tokenizer_model={data.tokenizer_model}", f"train.out_dir={out_dir}",
                 "--deepspeed_config", "zero0"]
    launcher = ([sys.executable, "-m", "megamu.train"] if pipeline == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={pipeline}",
                 "--module", "megamu.train"])
    env = {**without_launch_env(os.environ), "OMP_NUM_THREADS": "1"}  # each run is its own world
    done = subprocess.run([*launcher, "--config", "tiny", *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=args.run_timeout)
    if done.returncode != 0:
        raise RuntimeError(f"PP={pipeline}, m={micro_batches} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        rates = [r["tokens_per_s"] for r in map(json.loads, handle) if r["kind"] == "train" and r["step"] > 2]
    return statistics.median(rates)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batches", default="1,2,4,8", help="micro batches per optimizer step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--data-dir", default=os.path.join("runs", "bench", "data"))
    parser.add_argument("--run-timeout", type=float, default=600, help="seconds before a hung run is killed")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error("--steps must be at least 4: the first two steps are not timed")
    data = prepare_sample_data(os.path.join(REPO, args.data_dir), documents=600, vocab_size=1024)
    rows = ["| micro batches m | PP=1 tok/s | PP=2 tok/s | efficiency (PP=2 / 2·PP=1) | 1 − bubble m/(m+1) |",
            "| --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        for m in (int(v) for v in args.micro_batches.split(",")):
            single = run(1, m, args, data, os.path.join(tmp, f"pp1_m{m}"))
            piped = run(STAGES, m, args, data, os.path.join(tmp, f"pp2_m{m}"))
            ideal = m / (m + STAGES - 1)
            rows.append(f"| {m} | {single:,.0f} | {piped:,.0f} | {piped / (2 * single):.2f} | {ideal:.2f} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
