"""End-to-end trainer tests on CPU (gloo, fp32), each run a real `python -m megamu.train` on 1 or 2
ranks: ZeRO 0/1/2/3 and DP=2 give the DP=1 loss trajectory, exact (bitwise) resume at DP=1 and
DP=2, an interrupted checkpoint is never resumed from, and metrics.jsonl follows DESIGN.md."""
from __future__ import annotations

import json
import math
import os

import pytest
import yaml

from dist import run_script, run_train

MAX_STEPS = 6
REL_TOL = 1e-5


def write_config(path: str, tokenizer_model: str, data_prefix: str, out_dir: str) -> str:
    cfg = {
        "model": {"hidden_size": 32, "n_layers": 2, "n_heads": 4, "seq_len": 32},
        "mup": {"base_hidden_size": 16},
        "data": {"path": data_prefix, "tokenizer_model": tokenizer_model, "split": "90,10,0"},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": MAX_STEPS, "warmup_steps": 2,
                  "lr": 1e-2, "out_dir": out_dir, "eval_iters": 1, "eval_interval": 3},
        "log": {"interval": 1, "progress_bar": False},
    }
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def read_records(run_dir: str, kind: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def losses(run_dir: str) -> dict[int, float]:
    """Train loss per step; a resumed run's later record of a step wins."""
    return {r["step"]: r["loss"] for r in read_records(run_dir, "train")}


def same_losses(actual: dict[int, float], expected: dict[int, float]) -> bool:
    """The same steps with losses equal to REL_TOL (a layout or resume that changed the math is far off)."""
    return actual.keys() == expected.keys() and all(actual[s] == pytest.approx(expected[s], rel=REL_TOL)
                                                     for s in expected)


def stopped_and_resumed(config: str, out_dir, *overrides: str, nprocs: int = 1, ds: str = "zero1") -> dict[int, float]:
    """Losses of a run stopped after step 3 and resumed to the end."""
    train_ok(config, out_dir, *overrides, "train.stop_at_step=3", nprocs=nprocs, ds=ds)
    train_ok(config, out_dir, *overrides, "train.resume=true", nprocs=nprocs, ds=ds)
    return losses(str(out_dir))


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_tokenizer, tiny_dataset_prefix) -> str:
    root = tmp_path_factory.mktemp("trainer")
    return write_config(str(root / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix, str(root / "runs"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def train_ok(config: str, out_dir, *overrides: str, nprocs: int = 1, ds: str = "zero1") -> str:
    result = run_train(["--config", config, f"train.out_dir={out_dir}", *overrides,
                        "--deepspeed_config", f"ds_configs/{ds}.json"], nprocs)
    assert result.ok, result.describe()
    return str(out_dir)


@pytest.fixture(scope="module")
def reference(config, runs) -> str:
    """The uninterrupted DP=1 run every other run is compared with (also logging to wandb, offline by default)."""
    return train_ok(config, runs / "reference", "log.wandb_project=megamu-tests")


@pytest.fixture(scope="module")
def dp2_zero1(config, runs) -> str:
    return train_ok(config, runs / "dp2_zero1", nprocs=2, ds="zero1")


def assert_close(got: dict[int, float], want: dict[int, float], rel: float) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        assert math.isclose(got[step], want[step], rel_tol=rel, abs_tol=0), (step, got[step], want[step])


def test_loss_decreases_and_metrics_follow_design(reference):
    records = [json.loads(line) for line in open(os.path.join(reference, "metrics.jsonl"))]
    meta = records[0]
    assert meta["kind"] == "meta"
    for key in ("params", "non_embedding_params", "flops_per_token", "hidden_size", "n_layers", "tp", "pp", "dp"):
        assert key in meta, key
    assert (meta["hidden_size"], meta["n_layers"], meta["tp"], meta["pp"], meta["dp"]) == (32, 2, 1, 1, 1)
    assert meta["peak_source"] == "measured" and meta["peak_flops"] > 0  # CPU: a timed matmul
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1))
    for r in train:
        assert set(r) >= {"step", "tokens", "flops", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "time_s"}
        assert r["tokens"] == r["step"] * 8 * 32
        assert r["flops"] == r["tokens"] * meta["flops_per_token"]
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * meta["flops_per_token"] / meta["peak_flops"])
        assert r["grad_norm"] > 0
    assert train[-1]["loss"] < train[0]["loss"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert set(r) >= {"step", "tokens", "flops", "val_loss", "val_bpb"}
        assert r["val_bpb"] is not None and 0 < r["val_bpb"] < r["val_loss"] / math.log(2)
    resolved = yaml.safe_load(open(os.path.join(reference, "config.yaml")))
    assert resolved["model"]["vocab_size"] == 512
    assert os.path.getsize(os.path.join(reference, "loss_curve.png")) > 0


def test_wandb_runs_offline_inside_the_run_dir(reference):
    wandb_dir = os.path.join(reference, "wandb")
    offline_runs = [d for d in os.listdir(wandb_dir) if d.startswith("offline-run-")]
    assert len(offline_runs) == 1, os.listdir(wandb_dir)
    run_files = os.listdir(os.path.join(wandb_dir, offline_runs[0]))
    assert any(f.endswith(".wandb") for f in run_files), run_files


def test_dp2_matches_dp1(reference, dp2_zero1):
    assert read_records(dp2_zero1, "meta")[0]["dp"] == 2
    assert_close(losses(dp2_zero1), losses(reference), REL_TOL)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_stages_match_with_two_ranks(config, runs, reference, dp2_zero1, stage):
    run = train_ok(config, runs / f"dp2_zero{stage}", nprocs=2, ds=f"zero{stage}")
    assert_close(losses(run), losses(dp2_zero1), REL_TOL)
    grad_norms = {r["step"]: r["grad_norm"] for r in read_records(run, "train")}
    want = {r["step"]: r["grad_norm"] for r in read_records(reference, "train")}
    assert_close(grad_norms, want, 1e-4)


def test_exact_resume_dp2(config, runs, dp2_zero1):
    run = runs / "resume_dp2"
    train_ok(config, run, "train.stop_at_step=3", nprocs=2)
    assert max(losses(str(run))) == 3
    train_ok(config, run, "train.resume=true", nprocs=2)
    assert losses(str(run)) == losses(dp2_zero1)  # bitwise: exact float equality, step for step


# Dies like a killed node would, after DeepSpeed wrote global_step4 (and its `latest`) but
# before megamu's pointer moved.
CRASH_BEFORE_POINTER = """
import os, sys
from megamu.checkpoint import store
write_pointer = store.write_pointer
def crash_at_step4(ckpt_dir, tag):
    if tag == "global_step4":
        os._exit(17)
    write_pointer(ckpt_dir, tag)
store.write_pointer = crash_at_step4
from megamu.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_interrupted_checkpoint_is_not_resumed_and_dp1_resume_is_exact(config, runs, reference):
    run = runs / "crash"
    crashed = run_script(CRASH_BEFORE_POINTER, ["--config", config, f"train.out_dir={run}", "train.save_interval=2",
                                                "--deepspeed_config", "ds_configs/zero1.json"])
    assert crashed.returncodes == [17], crashed.describe()
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "global_step4"  # DeepSpeed's pointer moved ...
    assert (ckpt / "latest_complete").read_text().strip() == "global_step2"  # ... megamu's did not
    train_ok(config, run, "train.resume=true", "train.save_interval=2")
    # Resumed from global_step2 (steps 3-4 retrained), bitwise equal to the uninterrupted run.
    assert [r["step"] for r in read_records(str(run), "train")] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert losses(str(run)) == losses(reference)
    log = open(run / "metrics.jsonl").read()
    assert log.count('"kind": "meta"') == 1  # a resumed run appends


def test_resuming_with_another_zero_stage_names_the_cause(config, runs, reference):
    import shutil

    run = runs / "other_stage"
    shutil.copytree(reference, run)  # saved under ZeRO 1
    result = run_train(["--config", config, f"train.out_dir={run}", "train.resume=true", "train.max_steps=8",
                        "--deepspeed_config", "ds_configs/zero0.json"], 1)
    assert result.returncodes == [2], result.describe()
    out = result.ranks[0].output
    assert "saved under ZeRO stage 1, and this run uses stage 0" in out and "--deepspeed_config zero1" in out, out
    assert out.count("error:") == 1 and "Traceback" not in out


def test_one_ranks_corrupt_checkpoint_file_is_one_line_from_it_and_one_naming_it(config, runs, dp2_zero1):
    import shutil

    run = runs / "corrupt_rng_rank1"
    shutil.copytree(dp2_zero1, run)
    rng_file = run / "checkpoints" / "global_step6" / "rng_rank00001.pt"
    rng_file.write_bytes(bytes(rng_file.stat().st_size))  # same size: only loading it shows the damage
    result = run_train(["--config", config, f"train.out_dir={run}", "train.resume=true", "train.max_steps=8",
                        "--deepspeed_config", "ds_configs/zero1.json"], 2)
    assert result.returncodes == [4, 2], result.describe()
    for rank in result.ranks:
        assert rank.output.count("error:") == 1 and "Traceback" not in rank.output, result.describe()
    assert "rank 1 (host" in result.ranks[0].output and "failed (its log has the cause)" in result.ranks[0].output
    assert "rng_rank00001.pt, the random state of rank 1 in checkpoint global_step6, is missing or corrupt" in \
        result.ranks[1].output


def test_resuming_a_finished_run_trains_nothing_and_succeeds(config, runs, reference):
    import shutil

    run = runs / "finished"
    shutil.copytree(reference, run)
    before = open(run / "metrics.jsonl").read()
    result = run_train(["--config", config, f"train.out_dir={run}", "train.resume=true",
                        "--deepspeed_config", "ds_configs/zero1.json"], 1)
    assert result.ok, result.describe()
    assert read_records(str(run), "train") == read_records(reference, "train")  # no step retrained
    assert open(run / "metrics.jsonl").read().startswith(before)
