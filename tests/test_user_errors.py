"""Bad input and interrupted writes, as a careless or unlucky user meets them: each ends in one clear line
(or a warning and a fallback), never a traceback or a silently wrong result (issue 13, "clear instead of
noisy"). Multi-rank cases are in test_train_e2e.py (one rank's corrupt checkpoint file)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat

import pytest

from dist import run_train
from megamu.checkpoint.layout import CheckpointLayout, check_resumable
from megamu.checkpoint.manifest import MANIFEST, damage, intact_tag, write_manifest
from megamu.checkpoint.pointer import write_pointer
from megamu.checkpoint.rng import load_rng_state, rng_path, save_rng_state
from megamu.checkpoint.store import resume_tag
from megamu.cli import predict as predict_tool
from megamu.config import load_config
from megamu.data.preprocess import preprocess
from megamu.errors import CheckpointError, MegamuWarning, RankCheckpointError
from megamu.fileio import NEW_FILE_MODE
from megamu.scaling.fit import FitError
from megamu.scaling.points import read_points_csv
from megamu.scaling.runs import read_run_point
from megamu.training.metrics import RunLogger
from test_train_e2e import losses, write_config


# ---- loss points from a CSV ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    # A blank line does not shift the line named (the bad value is on line 5).
    ("params,loss\n1e6,3.0\n\n2e6,2.8\n4e6,abc\n", r"p.csv:5: column loss is 'abc', not a number"),
    ("params,loss\n1e6,3.0\n2e6,2.8,9\n", r"p.csv:3: 3 values but the header names 2 columns"),
    ("params,loss,width\n1e6,3.0,64\n2e6,2.8,96.5\n", r"p.csv:3: column width is 96.5, not a whole number"),
    ("params,loss\n1e6,-3.0\n", r"p.csv:2: the loss is -3.0; a loss to fit must be positive"),
])
def test_a_bad_csv_value_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(FitError, match=message):
        read_points_csv(str(path), "params")


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("params,loss\n1e6,3.0\n".encode("utf-8-sig"))  # as spreadsheets export it
    (point,) = read_points_csv(str(path), "params")
    assert (point.params, point.loss) == (1e6, 3.0)


# ---- metrics.jsonl cut short by a killed trainer ---------------------------------------------------------
def _metrics(run_dir, tail: str) -> str:
    os.makedirs(run_dir, exist_ok=True)
    lines = [{"kind": "meta", "params": 1000, "hidden_size": 32}]
    lines += [{"kind": "train", "step": s, "tokens": 100 * s, "flops": 1e6 * s, "loss": 4.0 - 0.1 * s}
              for s in range(1, 5)]
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines) + tail)
    return path


def test_a_cut_short_last_record_is_skipped_with_a_warning(tmp_path, capsys):
    run = tmp_path / "run"
    _metrics(run, '{"kind": "train", "step": 5, "tok')
    with pytest.warns(MegamuWarning, match=r"metrics.jsonl:6: skipped the last line, a record cut short"):
        point = read_run_point(str(run))
    assert (point.step, point.loss) == (4, pytest.approx(3.6))
    # The tool says it as one `warning:` line per torn file, then fits.
    runs = [str(tmp_path / f"run{i}") for i in range(3)]
    for run_dir in runs:
        _metrics(run_dir, '{"kind": "train", "step": 5, "tok')
    assert predict_tool.main([*runs, "--x", "tokens"]) in (0, 2)
    warnings_said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings_said) == 3 and all("metrics.jsonl:6: skipped the last line" in w for w in warnings_said)


def test_a_malformed_line_inside_the_file_is_still_an_error(tmp_path):
    run = tmp_path / "run"
    path = _metrics(run, "")
    with open(path, "a") as f:
        f.write("not json\n" + json.dumps({"kind": "train", "step": 5, "tokens": 500, "loss": 3.5}) + "\n")
    with pytest.raises(FitError, match=r"metrics.jsonl:6: not valid JSON"):
        read_run_point(str(run))


def test_a_resumed_writer_drops_the_torn_record_instead_of_gluing_onto_it(tmp_path):
    run = tmp_path / "run"
    path = _metrics(run, '{"kind": "train", "st')
    cfg = load_config(None, [f"train.out_dir={run}", "log.progress_bar=false"])
    with pytest.warns(MegamuWarning, match="dropped its last 21 bytes"):
        logger = RunLogger(cfg, {"params": 1000}, is_writer=True, start_step=4)
    logger.log_eval({"step": 4, "tokens": 400, "flops": 4e6, "val_loss": 3.7})
    logger.close()
    records = [json.loads(line) for line in open(path)]  # every line whole again
    assert [r["kind"] for r in records] == ["meta"] + ["train"] * 4 + ["eval"]


def test_an_empty_metrics_file_is_not_taken_for_a_torn_record(tmp_path, recwarn):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")  # a writer killed before its first record
    cfg = load_config(None, [f"train.out_dir={run}", "log.progress_bar=false"])
    RunLogger(cfg, {"params": 1000}, is_writer=True, start_step=0).close()
    assert not [w for w in recwarn if issubclass(w.category, MegamuWarning)]
    assert json.loads(open(run / "metrics.jsonl").readline())["kind"] == "meta"


# ---- preprocessing: a killed run's temporary files, permissions ------------------------------------------
def test_preprocess_removes_a_killed_runs_temporaries_keeps_a_live_writers_and_honours_the_umask(
        tmp_path, tiny_tokenizer):
    prefix = str(tmp_path / "d")
    stale = [tmp_path / ".d_text_document.k1ll3d.bin.tmp", tmp_path / ".d_text_document.k1ll3d.idx.tmp",
             tmp_path / "d_text_document.stats.json.k1ll3d.tmp"]
    for path in stale:
        path.write_bytes(b"left by a killed run")
    live = tmp_path / ".d_text_document.l1ve.bin.tmp"
    with open(live, "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running writer holds its temporary file
        with pytest.warns(MegamuWarning, match="removed .* temporary file"):
            preprocess(["sample:2"], prefix, tiny_tokenizer.model_path, progress=False)
        assert not any(path.exists() for path in stale)
        assert live.exists()
    for suffix in (".bin", ".idx", ".stats.json"):
        mode = stat.S_IMODE(os.stat(f"{prefix}_text_document{suffix}").st_mode)
        assert mode == NEW_FILE_MODE, (suffix, oct(mode))  # mkstemp's 0600 is not kept


# ---- checkpoints: damaged files, fallback, stage, RNG ----------------------------------------------------
def _checkpoint(ckpt_dir, step: int, manifest: bool = True) -> str:
    tag = f"global_step{step}"
    os.makedirs(os.path.join(ckpt_dir, tag))
    for name in ("mp_rank_00_model_states.pt", "rng_rank00000.pt"):
        with open(os.path.join(ckpt_dir, tag, name), "wb") as f:
            f.write(bytes(100 + step))
    if manifest:
        write_manifest(ckpt_dir, tag)
    return tag


def test_the_manifest_lists_the_checkpoints_files_only(tmp_path):
    tag = _checkpoint(str(tmp_path), 2)
    with open(tmp_path / tag / MANIFEST) as f:
        assert json.load(f)["files"] == {"mp_rank_00_model_states.pt": 102, "rng_rank00000.pt": 102}
    assert damage(str(tmp_path), tag) is None


def test_a_truncated_or_missing_file_falls_back_to_the_previous_complete_checkpoint(tmp_path):
    ckpt = str(tmp_path)
    _checkpoint(ckpt, 2)
    _checkpoint(ckpt, 4, manifest=False)  # never complete: not a fallback
    newest = _checkpoint(ckpt, 6)
    os.truncate(os.path.join(ckpt, newest, "mp_rank_00_model_states.pt"), 10)
    os.remove(os.path.join(ckpt, newest, "rng_rank00000.pt"))
    write_pointer(ckpt, newest)
    with pytest.warns(MegamuWarning, match=r"global_step6 .* is damaged \(mp_rank_00_model_states.pt has 10 bytes, "
                                           r"not the 106 saved; rng_rank00000.pt is missing\); resuming from "
                                           r"global_step2"):
        assert resume_tag(ckpt) == "global_step2"


def test_with_no_intact_checkpoint_the_resume_names_the_damage_and_stops(tmp_path):
    ckpt = str(tmp_path)
    older = _checkpoint(ckpt, 2)
    newest = _checkpoint(ckpt, 4)
    os.remove(os.path.join(ckpt, older, "rng_rank00000.pt"))
    shutil.rmtree(os.path.join(ckpt, newest))
    write_pointer(ckpt, newest)
    with pytest.raises(CheckpointError, match=r"global_step4 .* is damaged \(its folder .* is missing\), and no "
                                              r"earlier complete checkpoint is intact"):
        resume_tag(ckpt)


def test_a_checkpoint_without_a_manifest_is_resumed_as_before(tmp_path):
    ckpt = str(tmp_path)
    tag = _checkpoint(ckpt, 2, manifest=False)
    assert intact_tag(ckpt, tag) == (tag, None)


@pytest.mark.parametrize("saved, current, refused", [(0, 3, True), (1, 0, True), (3, 1, True), (1, 2, False)])
def test_another_zero_stage_is_refused_before_loading_naming_the_saved_one(saved, current, refused):
    check = lambda: check_resumable(CheckpointLayout(1, 1, 2, saved), CheckpointLayout(1, 1, 2, current), "ckpt")
    if not refused:
        check()  # ZeRO 1 and 2 save the same files
        return
    with pytest.raises(CheckpointError, match=rf"saved under ZeRO stage {saved}, and this run uses stage {current}.*"
                                              rf"pass --deepspeed_config zero{saved}"):
        check()


def test_a_corrupt_rng_file_is_this_ranks_error_not_a_traceback(tmp_path):
    ckpt = str(tmp_path)
    os.makedirs(tmp_path / "global_step2")
    save_rng_state(ckpt, "global_step2", 0)
    path = rng_path(ckpt, "global_step2", 0)
    with open(path, "r+b") as f:  # overwritten in place: same size, so no manifest notices
        f.write(bytes(os.path.getsize(path)))
    with pytest.raises(RankCheckpointError, match="is missing or corrupt"):
        load_rng_state(ckpt, "global_step2", 0)


# ---- who prints a user error on a multi-rank launch --------------------------------------------------------
def _as_rank(monkeypatch, rank: int, local_rank: int) -> None:
    for key, value in {"RANK": rank, "WORLD_SIZE": 4, "LOCAL_RANK": local_rank, "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(key, str(value))


@pytest.mark.parametrize("rank, local_rank, says", [(0, 0, True), (1, 1, False), (2, 0, True)])
def test_one_rank_per_node_says_a_user_error_the_others_exit_2_quietly(monkeypatch, capsys, rank, local_rank, says):
    from megamu import train

    _as_rank(monkeypatch, rank, local_rank)
    assert train.main(["--config", "tiny", "model.hidden_size=-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == (1 if says else 0) and "Traceback" not in err, err


def test_a_rank_whose_own_checkpoint_file_is_bad_says_so(monkeypatch, capsys):
    from megamu import train

    def bad_rng_file(cfg):
        raise RankCheckpointError("rng_rank00001.pt is missing or corrupt")

    _as_rank(monkeypatch, 1, 1)
    monkeypatch.setattr(train, "train", bad_rng_file)
    assert train.main(["--config", "tiny"]) == 2
    assert capsys.readouterr().err == "error: rng_rank00001.pt is missing or corrupt\n"


# ---- end to end: a damaged newest checkpoint --------------------------------------------------------------
def test_a_run_whose_newest_checkpoint_is_truncated_resumes_exactly_from_the_previous_one(
        tmp_path, tiny_tokenizer, tiny_dataset_prefix):
    config = write_config(str(tmp_path / "c.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix,
                          str(tmp_path / "run"))
    run = tmp_path / "run"
    args = ["--config", config, "train.max_steps=4", "train.save_interval=2", "train.eval_interval=0"]
    first = run_train(args)
    assert first.ok, first.describe()
    want = losses(str(run))
    model_file = run / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt"
    os.truncate(model_file, 1000)  # a copy cut short
    resumed = run_train([*args, "train.resume=true"])
    out = resumed.ranks[0].output
    assert resumed.ok, resumed.describe()
    assert "warning: checkpoint global_step4" in out and "resuming from global_step2" in out, out
    assert "resumed from global_step2" in out and "Traceback" not in out
    assert losses(str(run)) == want  # steps 3-4 again, bitwise as before
    assert damage(str(run / "checkpoints"), "global_step4") is None  # saved anew, whole
