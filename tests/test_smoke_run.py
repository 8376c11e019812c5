"""Short runs a new user starts first: a shipped config by name with a warm-up longer than the run (it warms
up over the run and says so once), and train.dtype=bf16 on CPU through DeepSpeed's bf16 mode."""
from __future__ import annotations

import json
import math
import os
import subprocess
from typing import Optional

from scripts import script

# The shipped `tiny` config, shrunk to seconds; its warm-up (20 steps) is longer than these runs.
SMALL = ["model.hidden_size=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.seq_len=32",
         "mup.base_hidden_size=32", "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_iters=1",
         "log.interval=1", "log.progress_bar=false"]


def train(tmp_path, tokenizer, prefix, *overrides: str,
          env: Optional[dict[str, str]] = None) -> tuple[subprocess.CompletedProcess, str]:
    run_dir = str(tmp_path / "run")
    result = subprocess.run([script("megamu-train"), "--config", "tiny", *SMALL, f"data.path={prefix}",
                             f"data.tokenizer_model={tokenizer.model_path}", f"train.out_dir={run_dir}", *overrides],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stdout + result.stderr
    return result, run_dir


def records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def test_a_shipped_config_with_a_longer_warmup_runs_and_says_so_once(tmp_path, tiny_tokenizer, tiny_dataset_prefix):
    result, run_dir = train(tmp_path, tiny_tokenizer, tiny_dataset_prefix, "train.max_steps=3")
    output = result.stdout + result.stderr
    assert output.count("train.warmup_steps=20 is longer than train.max_steps=3") == 1, output
    train_records = [r for r in records(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    # Linear warm-up over the 3 steps of the run: the LR climbs to the peak on the last one.
    lrs = [r["lr"] for r in train_records]
    assert lrs[0] < lrs[1] < lrs[2] == 3e-3


def test_bf16_on_cpu_trains_through_deepspeeds_bf16_mode(tmp_path, tiny_tokenizer, tiny_dataset_prefix):
    # No GPU visible, also on a CUDA machine: this is the CPU accelerator's bf16 path.
    _, run_dir = train(tmp_path, tiny_tokenizer, tiny_dataset_prefix, "train.max_steps=2", "train.dtype=bf16",
                       env={"CUDA_VISIBLE_DEVICES": ""})
    meta, *rest = records(run_dir)
    assert meta["dtype"] == "bf16" and meta["peak_source"] == "measured" and meta["peak_flops"] > 0
    losses = [r["loss"] for r in rest if r["kind"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert all(r["mfu"] > 0 for r in rest if r["kind"] == "train")
