"""Resuming with changed settings (issue 13, items 1 and 2): a model change is refused before anything is loaded
or written, schedule and data changes are said once as old → new, the tokens and flops columns count the samples
consumed (continuous across a global batch change), the data stream continues exactly when the saved shuffle
still covers the run and says it is reshuffled when not, and a resume without a checkpoint says so once."""
from __future__ import annotations

import os
import shutil

import pytest

from dist import run_train
from megamu.checkpoint import DataPosition, check_resume, save_data_position, write_pointer
from megamu.config import load_config, save_config
from megamu.errors import ConfigError
from test_train_e2e import read_records

SEQ_LEN = 32
TINY = ["model.hidden_size=32", "model.n_layers=1", "model.n_heads=2", f"model.seq_len={SEQ_LEN}",
        "mup.base_hidden_size=32", "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=4",
        "train.warmup_steps=1", "train.lr=0.01", "train.eval_iters=1", "data.split=90,10,0", "log.interval=1",
        "log.progress_bar=false", "train.deepspeed_config=zero0"]


def train(out_dir, tokenizer, prefix, *overrides: str):
    return run_train([*TINY, f"data.path={prefix}", f"data.tokenizer_model={tokenizer.model_path}",
                      f"train.out_dir={out_dir}", *overrides], 1).ranks[0]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_tokenizer, tiny_dataset_prefix):
    """A run asked to resume in an empty directory, stopped after step 2 of 4 with a checkpoint."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    rank = train(run, tiny_tokenizer, tiny_dataset_prefix, "train.resume=true", "train.stop_at_step=2")
    assert rank.returncode == 0, rank.output
    return run, rank.output


@pytest.fixture
def resume(stopped, tmp_path, tiny_tokenizer, tiny_dataset_prefix):
    """Resume a copy of the stopped run with some overrides; returns (run dir, rank 0's result)."""
    def resume_with(*overrides: str):
        run = tmp_path / "run"
        shutil.copytree(stopped[0], run)
        return run, train(run, tiny_tokenizer, tiny_dataset_prefix, "train.resume=true", *overrides)
    return resume_with


def test_resume_without_a_checkpoint_says_so_once(stopped):
    run, output = stopped
    assert output.count(f"no checkpoint found in {run / 'checkpoints'}, starting from step 0") == 1, output


def test_a_model_change_is_refused_naming_the_key_and_leaves_config_yaml_untouched(resume, stopped):
    before = (stopped[0] / "config.yaml").read_bytes()
    run, rank = resume("model.hidden_size=64")
    assert rank.returncode == 2, rank.output
    errors = [line for line in rank.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.hidden_size 32 → 64" in errors[0], rank.output
    assert "train.out_dir" in errors[0] and "Traceback" not in rank.output
    assert (run / "config.yaml").read_bytes() == before
    assert [r["step"] for r in read_records(str(run), "train")] == [1, 2]


def test_a_schedule_change_is_noted_once_with_old_and_new(resume):
    run, rank = resume("train.lr=0.02", "train.max_steps=3")
    assert rank.returncode == 0, rank.output
    assert rank.output.count("train.max_steps 4 → 3, train.lr 0.01 → 0.02") == 1, rank.output
    assert rank.output.count("the train data continues exactly after step 2 (sample 8)") == 1, rank.output
    assert [r["step"] for r in read_records(str(run), "train")] == [1, 2, 3]
    assert "lr: 0.02" in (run / "config.yaml").read_text()  # written once the checkpoint loaded


def test_a_global_batch_change_keeps_the_tokens_column_continuous_and_says_so(resume):
    run, rank = resume("train.global_batch_size=8")
    assert rank.returncode == 0, rank.output
    assert rank.output.count("train.global_batch_size 4 → 8") == 1, rank.output
    # 8 samples consumed + 2 steps of 8 need 24: more than the saved shuffle of 4 × 4 holds.
    assert rank.output.count("the train sample order after step 2 (sample 8) is reshuffled over 24 samples "
                             "(was 16") == 1, rank.output
    meta, = read_records(str(run), "meta")
    train = read_records(str(run), "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["tokens"] for r in train] == [4 * SEQ_LEN, 8 * SEQ_LEN, 16 * SEQ_LEN, 24 * SEQ_LEN]
    assert all(r["flops"] == r["tokens"] * meta["flops_per_token"] for r in train)
    assert read_records(str(run), "eval")[-1]["tokens"] == 24 * SEQ_LEN


# ---- the plan, without training -------------------------------------------------------------------------------

@pytest.fixture
def saved_run(tmp_path):
    """A run directory as a run of 4 steps of 4 samples leaves it after a checkpoint at step 2."""
    run = str(tmp_path / "run")
    ckpt = os.path.join(run, "checkpoints")
    os.makedirs(ckpt)
    save_config(load_config(None, [f"train.out_dir={run}", "train.global_batch_size=4", "train.max_steps=4"]),
                os.path.join(run, "config.yaml"))
    write_pointer(ckpt, "global_step2")
    save_data_position(ckpt, "global_step2", DataPosition(step=2, consumed_samples=8, train_samples=16))
    return run


def plan(run: str, *overrides: str):
    cfg = load_config(os.path.join(run, "config.yaml"), list(overrides))
    return check_resume(cfg, os.path.join(run, "checkpoints"), "global_step2")


def test_a_global_batch_not_dividing_the_consumed_samples_is_refused(saved_run):
    with pytest.raises(ConfigError, match="train.global_batch_size=3 does not divide the 8 samples"):
        plan(saved_run, "train.global_batch_size=3")


def test_a_smaller_global_batch_continues_the_same_shuffle(saved_run):
    changes = plan(saved_run, "train.global_batch_size=2")
    assert changes.train_samples == 16  # 8 + 2 × 2 fit in the saved shuffle: the same samples come next
    assert any("continues exactly after step 2 (sample 8), in the same shuffle of 16" in n for n in changes.notes)


def test_a_seed_change_says_the_data_comes_from_a_new_shuffle(saved_run):
    changes = plan(saved_run, "train.seed=7")
    assert "train.seed 1234 → 7" in changes.notes[0]
    assert "new shuffle of 16 samples, as train.seed changed" in changes.notes[1]


def test_an_unchanged_resume_notes_nothing_and_a_checkpoint_without_position_is_planned_from_its_config(saved_run):
    os.remove(os.path.join(saved_run, "checkpoints", "global_step2", "data_position.json"))
    changes = plan(saved_run, "train.resume=true", "train.save_interval=1")
    assert changes.notes == []
    assert changes.position == DataPosition(step=2, consumed_samples=8, train_samples=16)
