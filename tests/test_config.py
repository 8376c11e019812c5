"""Config errors name the key and the fix, and stop a run before anything is allocated."""
from __future__ import annotations

import json
import os

import pytest

from dist import run_train
from megamu.config import Config, ConfigError, load_config
from megamu.training.ds_config import build_ds_config
from megamu.config import resolve


@pytest.fixture
def base(tiny_tokenizer, tiny_dataset_prefix) -> list[str]:
    return [f"data.path={tiny_dataset_prefix}", f"data.tokenizer_model={tiny_tokenizer.model_path}",
            "model.hidden_size=64", "model.n_heads=4", "train.micro_batch_size=2", "train.global_batch_size=8"]


@pytest.fixture
def cfg(base) -> Config:
    return load_config(None, base)


def error_of(cfg: Config, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(cfg, world_size, need_data=True)
        build_ds_config(cfg, world_size)
    return str(info.value)


def test_valid_config_passes_and_fills_vocab_from_tokenizer(cfg):
    resolve(cfg, world_size=2, need_data=True)
    assert cfg.model.vocab_size == 512


def test_heads_must_divide_hidden(cfg):
    cfg.model.n_heads = 5
    assert "model.n_heads=5 does not divide model.hidden_size=64" in error_of(cfg)


def test_kv_heads_must_divide_heads(cfg):
    cfg.model.n_kv_heads = 3
    assert "model.n_kv_heads=3 does not divide model.n_heads=4" in error_of(cfg)


def test_global_batch_must_divide_by_micro_times_world(cfg):
    message = error_of(cfg, world_size=3)
    assert "train.global_batch_size=8" in message and "set it to a multiple of 6" in message


def test_missing_data_file_names_the_key_and_the_tool(cfg, tmp_path):
    cfg.data.path = str(tmp_path / "nothing_text_document")
    message = error_of(cfg)
    assert "data.path" in message and "nothing_text_document.bin not found" in message
    assert "megamu-preprocess" in message


def test_unknown_key_in_yaml_and_in_overrides(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.max_step'.*train.max_steps"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"command line: unknown key 'model.hiden_size'"):
        load_config(None, ["model.hiden_size=64"])


def test_ds_json_disagreeing_with_megamu_names_both(cfg, tmp_path):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}))
    cfg.train.deepspeed_config = str(ds_path)
    message = error_of(cfg)
    assert "'train_micro_batch_size_per_gpu' = 4 disagrees with train.micro_batch_size" in message


def test_ds_json_batch_fields_are_derived(cfg):
    cfg.train.deepspeed_config = "ds_configs/zero2.json"
    resolve(cfg, world_size=2, need_data=True)
    ds = build_ds_config(cfg, dp_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 2, 8)
    assert ds["gradient_clipping"] == cfg.train.grad_clip and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False  # CPU: fp32


def test_default_zero_stage_is_0_at_one_rank_and_1_otherwise_or_for_muon(cfg):
    cfg.train.deepspeed_config = None
    resolve(cfg, world_size=2, need_data=True)
    assert build_ds_config(cfg, dp_size=1)["zero_optimization"]["stage"] == 0
    assert build_ds_config(cfg, dp_size=2)["zero_optimization"]["stage"] == 1
    cfg.train.optimizer = "muon"
    assert build_ds_config(cfg, dp_size=1)["zero_optimization"]["stage"] == 1


def test_ds_json_may_not_own_the_lr_schedule(cfg, tmp_path):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    cfg.train.deepspeed_config = str(ds_path)
    assert "remove the 'scheduler' section" in error_of(cfg)


def test_muon_at_zero0_is_refused(cfg):
    cfg.train.optimizer = "muon"
    cfg.train.deepspeed_config = "ds_configs/zero0.json"
    assert "train.optimizer=muon" in error_of(cfg) and "zero1.json" in error_of(cfg)


def test_config_error_stops_the_entry_point_before_allocation(tmp_path, tiny_dataset_prefix, tiny_tokenizer):
    out_dir = tmp_path / "never"
    result = run_train([f"data.path={tiny_dataset_prefix}", f"data.tokenizer_model={tiny_tokenizer.model_path}",
                        "model.n_heads=3", f"train.out_dir={out_dir}"])
    assert result.returncodes == [2]
    assert "error: model.n_heads=3 does not divide model.hidden_size=256" in result.ranks[0].output
    assert "Traceback" not in result.ranks[0].output
    assert not os.path.exists(out_dir)


def test_entry_point_accepts_the_launchers_local_rank_and_overrides_anywhere():
    from megamu.train import parse_args

    args = parse_args(["--local_rank=1", "--config", "c.yaml", "train.lr=0.1", "--deepspeed_config",
                       "ds_configs/zero2.json", "train.max_steps=5"])
    assert (args.config, args.deepspeed_config) == ("c.yaml", "ds_configs/zero2.json")
    assert args.overrides == ["train.lr=0.1", "train.max_steps=5"]


def test_pipeline_parallelism_is_accepted_with_zero_0_and_1(cfg):
    cfg.parallel.pipeline, cfg.model.n_layers, cfg.parallel.pipeline_blocks = 2, 4, [3, 1]
    for stage in (0, 1):
        cfg.train.deepspeed_config = f"ds_configs/zero{stage}.json"
        resolve(cfg, world_size=2, need_data=True)
        assert build_ds_config(cfg, 1)["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("overrides, message", [
    (["train.deepspeed_config=ds_configs/zero2.json"], "pipeline engine supports ZeRO 0 and 1 only"),
    (["train.deepspeed_config=ds_configs/zero3.json"], "pipeline engine supports ZeRO 0 and 1 only"),
    (["model.n_layers=1"], "parallel.pipeline=2 is larger than model.n_layers=1"),
    (["parallel.pipeline_blocks=[3,2]"], "summing to model.n_layers=4 (e.g. [2, 2])"),
    (["parallel.pipeline_blocks=[4]"], "each of the parallel.pipeline=2 stages"),
    (["parallel.pipeline_blocks=[4,0]"], "a positive number of transformer blocks"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true"], "pipeline plus sequence parallelism is broken"),
])
def test_pipeline_config_errors(base, overrides, message):
    cfg = load_config(None, [*base, "parallel.pipeline=2", "model.n_layers=4", *overrides])
    assert message in error_of(cfg, world_size=4)


def test_a_warmup_longer_than_the_run_warms_up_over_the_run_and_says_so(cfg):
    cfg.train.max_steps, cfg.train.warmup_steps = 10, 50
    notes = resolve(cfg, world_size=1, need_data=True)
    assert cfg.train.warmup_steps == 10
    assert len(notes) == 1 and "train.warmup_steps=50 is longer than train.max_steps=10" in notes[0]
    assert resolve(cfg, world_size=1, need_data=True) == []  # resolved once: nothing left to say


def test_a_shipped_deepspeed_json_is_found_by_name_or_checkout_path_only(cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ds_configs/ folder here: only the shipped package data can answer
    for value in ("zero2", "ds_configs/zero2.json"):
        cfg.train.deepspeed_config = value
        resolve(cfg, world_size=1, need_data=True)
        assert os.path.basename(cfg.train.deepspeed_config) == "zero2.json" and os.path.isfile(cfg.train.deepspeed_config)
    cfg.train.deepspeed_config = "/my/dir/zero2.json"  # a mistyped path is not swapped for the shipped file
    assert "train.deepspeed_config: /my/dir/zero2.json not found" in error_of(cfg)


def test_a_negative_number_of_loader_workers_is_refused(cfg):
    cfg.data.loader_workers = -1
    assert "data.loader_workers=-1 must not be negative" in error_of(cfg)


@pytest.mark.parametrize("override, message", [
    ("mup.init_std=nan", "mup.init_std: expected a finite number, got 'nan'"),
    ("train.lr=inf", "train.lr: expected a finite number, got 'inf'"),
    ("train.max_steps=inf", "train.max_steps: expected an integer, got 'inf'"),
    ("train.max_steps=nan", "train.max_steps: expected an integer, got 'nan'"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
