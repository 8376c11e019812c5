"""Resuming in another layout, and ranks that see different checkpoints (`python -m megamu.train`, gloo).

- Another data-parallel size at ZeRO 0 continues the run: stop a DP=2 run at step 3 and resume it at DP=1
  (and DP=1 → DP=2); steps 4.. match an uninterrupted run, so the data stream (the sampler's
  consumed_samples), the optimizer state and the schedule all carried over.
- Another DP size under ZeRO 1 and 2 (same stage) continues the run the same way, through DeepSpeed's
  universal checkpoint, which rank 0 writes into `<tag>_universal`: at TP=1 and PP=1, at TP=2 (ZeRO 1,
  DP 2 → 1 and 1 → 2) and at PP=2 (ZeRO 1, DP 2 → 1), whose conversions hold the weights `megamu-merge` gives.
- Another TP size, ZeRO 0 resumed under ZeRO 1 on another DP size, and ZeRO 1 resumed under ZeRO 0 on another
  DP size are refused on every rank (exit 2) with one `error:` line from the node's first rank naming the fix
  (for TP: `megamu-merge`); so are DP changes under ZeRO 3 (checked on the layouts alone).
- A rank that does not see rank 0's `latest_complete` (node-local storage) stops, as do the others; it and
  rank 0 each name the pointer's path and shared storage.
"""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from dist import run_script, run_train
import torch

from megamu.checkpoint.layout import CheckpointLayout, check_resumable, needs_universal
from megamu.checkpoint.merge import merge_run_checkpoint
from megamu.model.transformer import stage_name
from megamu.errors import EXIT_USER_ERROR, CheckpointError
from test_train_e2e import MAX_STEPS, REL_TOL, assert_close, losses, read_records, write_config

STOP = 3
# The DP-size change reorders the sum behind each step's mean loss and gradient (one rank's micro batches
# or two ranks' all-reduce), the only difference from the uninterrupted run: the same fp32 drift that
# DESIGN.md's parallel-equivalence invariant allows (1e-5 relative). Step 4's loss checks the weights and
# the data position (another batch moves it by ~1e-2), steps 5-6 the optimizer state (Adam restarting from
# zero moments takes a differently sized step): both far above that drift.
COMMON = ["train.eval_interval=0"]

# Rank 1 reads no pointer, as a node whose train.out_dir is on its own disk would.
RANK1_SEES_NO_POINTER = """
import sys
import torch.distributed as dist
from megamu.checkpoint import store
read_pointer = store.read_pointer
store.read_pointer = lambda ckpt_dir: None if dist.get_rank() == 1 else read_pointer(ckpt_dir)
from megamu.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_tokenizer, tiny_dataset_prefix) -> str:
    root = tmp_path_factory.mktemp("resume_layout")
    return write_config(str(root / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix, str(root / "runs"))


def train_args(config: str, run_dir, ds: str, *overrides: str) -> list[str]:
    return ["--config", config, f"train.out_dir={run_dir}", *COMMON, *overrides, "--deepspeed_config", ds]


@pytest.fixture(scope="module")
def runs(config, tmp_path_factory) -> dict:
    """Every run of this module, in two waves of concurrent runs (start-up dominates each)."""
    root = tmp_path_factory.mktemp("resume_runs")
    first = {  # name: (run dir, nprocs, ds config, overrides)
        "reference": ("reference", 1, "ds_configs/zero0.json", []),
        "dp2_to_dp1": ("dp2_to_dp1", 2, "ds_configs/zero0.json", [f"train.stop_at_step={STOP}"]),
        "dp1_to_dp2": ("dp1_to_dp2", 1, "ds_configs/zero0.json", [f"train.stop_at_step={STOP}"]),
        "zero1_dp2": ("zero1_dp2", 2, "ds_configs/zero1.json", [f"train.stop_at_step={STOP}"]),
        "zero1_dp1_to_dp2": ("zero1_dp1_to_dp2", 1, "ds_configs/zero1.json", [f"train.stop_at_step={STOP}"]),
        "zero2_dp2_to_dp1": ("zero2_dp2_to_dp1", 2, "ds_configs/zero2.json", [f"train.stop_at_step={STOP}"]),
        "zero2_dp1_to_dp2": ("zero2_dp1_to_dp2", 1, "ds_configs/zero2.json", [f"train.stop_at_step={STOP}"]),
        "zero1_tp2_dp2_to_dp1": ("zero1_tp2_dp2_to_dp1", 4, "ds_configs/zero1.json",
                                 [f"train.stop_at_step={STOP}", "parallel.tensor=2"]),
        "zero1_tp2_dp1_to_dp2": ("zero1_tp2_dp1_to_dp2", 2, "ds_configs/zero1.json",
                                 [f"train.stop_at_step={STOP}", "parallel.tensor=2"]),
        "zero1_pp2_dp2_to_dp1": ("zero1_pp2_dp2_to_dp1", 4, "ds_configs/zero1.json",
                                 [f"train.stop_at_step={STOP}", "parallel.pipeline=2"]),
    }

    def run(spec):
        name, nprocs, ds, overrides, script = spec
        args = train_args(config, root / name, ds, *overrides)
        return run_script(script, args, nprocs) if script else run_train(args, nprocs)

    with ThreadPoolExecutor(len(first)) as pool:
        results = dict(zip(first, pool.map(run, [(*spec, None) for spec in first.values()])))
    for name, result in results.items():
        assert result.ok, f"{name}:\n{result.describe()}"
    # Refused resumes get copies, so each starts from the same untouched checkpoint.
    for copy, source in (("zero1_dp2_to_dp1", "zero1_dp2"), ("zero1_to_zero0", "zero1_dp2"),
                         ("zero1_to_tp2", "zero1_dp2"),
                         ("zero0_under_zero1", "dp1_to_dp2"), ("pointer_views", "dp2_to_dp1")):
        shutil.copytree(root / source, root / copy)
    second = {
        "dp2_to_dp1": ("dp2_to_dp1", 1, "ds_configs/zero0.json", ["train.resume=true"], None),
        "dp1_to_dp2": ("dp1_to_dp2", 2, "ds_configs/zero0.json", ["train.resume=true"], None),
        "zero1_dp2_to_dp1": ("zero1_dp2_to_dp1", 1, "ds_configs/zero1.json", ["train.resume=true"], None),
        "zero1_dp1_to_dp2": ("zero1_dp1_to_dp2", 2, "ds_configs/zero1.json", ["train.resume=true"], None),
        "zero2_dp2_to_dp1": ("zero2_dp2_to_dp1", 1, "ds_configs/zero2.json", ["train.resume=true"], None),
        "zero2_dp1_to_dp2": ("zero2_dp1_to_dp2", 2, "ds_configs/zero2.json", ["train.resume=true"], None),
        "zero1_tp2_dp2_to_dp1": ("zero1_tp2_dp2_to_dp1", 2, "ds_configs/zero1.json",
                                 ["train.resume=true", "parallel.tensor=2"], None),
        "zero1_tp2_dp1_to_dp2": ("zero1_tp2_dp1_to_dp2", 4, "ds_configs/zero1.json",
                                 ["train.resume=true", "parallel.tensor=2"], None),
        "zero1_pp2_dp2_to_dp1": ("zero1_pp2_dp2_to_dp1", 2, "ds_configs/zero1.json",
                                 ["train.resume=true", "parallel.pipeline=2"], None),
        "zero1_to_zero0": ("zero1_to_zero0", 1, "ds_configs/zero0.json", ["train.resume=true"], None),
        "zero1_to_tp2": ("zero1_to_tp2", 2, "ds_configs/zero1.json", ["train.resume=true", "parallel.tensor=2"],
                         None),
        "zero0_under_zero1": ("zero0_under_zero1", 2, "ds_configs/zero1.json", ["train.resume=true"], None),
        "pointer_views": ("pointer_views", 2, "ds_configs/zero0.json", ["train.resume=true"], RANK1_SEES_NO_POINTER),
    }
    with ThreadPoolExecutor(3) as pool:
        results.update(zip(second, pool.map(run, second.values())))
    return {"results": results, "dirs": {name: str(root / name) for name in {**first, **second}}}


@pytest.mark.parametrize("name, dp_before, dp_after", [
    ("dp2_to_dp1", 2, 1), ("dp1_to_dp2", 1, 2), ("zero1_dp2_to_dp1", 2, 1), ("zero1_dp1_to_dp2", 1, 2),
    ("zero2_dp2_to_dp1", 2, 1), ("zero2_dp1_to_dp2", 1, 2), ("zero1_tp2_dp2_to_dp1", 2, 1),
    ("zero1_tp2_dp1_to_dp2", 1, 2), ("zero1_pp2_dp2_to_dp1", 2, 1)])
def test_resume_with_another_dp_size_continues_the_uninterrupted_run(runs, name, dp_before, dp_after):
    result = runs["results"][name]
    assert result.ok, result.describe()
    assert f"saved with {dp_before} data-parallel rank(s), on {dp_after}" in result.ranks[0].output
    run_dir = runs["dirs"][name]
    assert [r["step"] for r in read_records(run_dir, "train")] == list(range(1, MAX_STEPS + 1))
    assert [r["dp"] for r in read_records(run_dir, "meta")] == [dp_before]  # the resumed run appended
    assert_close(losses(run_dir), losses(runs["dirs"]["reference"]), REL_TOL)


@pytest.mark.parametrize("name", ["zero1_dp2_to_dp1", "zero1_dp1_to_dp2", "zero2_dp2_to_dp1", "zero2_dp1_to_dp2",
                                  "zero1_tp2_dp2_to_dp1", "zero1_tp2_dp1_to_dp2", "zero1_pp2_dp2_to_dp1"])
def test_zero_resume_on_another_dp_size_loads_a_complete_universal_conversion(runs, name):
    result = runs["results"][name]
    assert f"into DeepSpeed's universal checkpoint global_step{STOP}_universal" in result.ranks[0].output
    ckpt_dir = os.path.join(runs["dirs"][name], "checkpoints")
    assert os.path.isfile(os.path.join(ckpt_dir, f"global_step{STOP}_universal", "zero", "optimizer_state.pt"))
    # Renamed into place once complete: no scratch folder, and no `latest_universal` beside megamu's pointer.
    assert not [entry for entry in os.listdir(ckpt_dir) if entry.startswith(".") or entry == "latest_universal"]


@pytest.mark.parametrize("name, tensor, pipeline", [("zero1_tp2_dp2_to_dp1", 2, 1), ("zero1_tp2_dp1_to_dp2", 2, 1),
                                                    ("zero1_pp2_dp2_to_dp1", 1, 2)])
def test_a_universal_conversion_holds_the_merged_weights(runs, name, tensor, pipeline):
    """The saved patterns merged every TP slice on its partition dim, kept the vocabulary padding and named
    each parameter as the engine's module does: the converted fp32 weights are megamu-merge's."""
    merged = merge_run_checkpoint(runs["dirs"][name], f"global_step{STOP}", target_tp=tensor)
    zero_dir = os.path.join(runs["dirs"][name], "checkpoints", f"global_step{STOP}_universal", "zero")
    for logical, weight in merged.items():
        converted = torch.load(os.path.join(zero_dir, stage_name(logical) if pipeline > 1 else logical, "fp32.pt"),
                               weights_only=False)["param"]
        assert torch.equal(converted, weight.float()), logical


def user_errors(result, speaking: tuple = (0,)) -> list[str]:
    """The `error:` line of each rank in `speaking`; every rank must have stopped with exit code 2, and the
    others (the node's ranks that meet the same error) without a word."""
    assert result.returncodes == [EXIT_USER_ERROR] * len(result.ranks), result.describe()
    errors = [[line for line in r.output.splitlines() if line.startswith("error:")] for r in result.ranks]
    assert [len(lines) for lines in errors] == [int(rank in speaking) for rank in range(len(errors))], \
        result.describe()
    return [errors[rank][0] for rank in speaking]


@pytest.mark.parametrize("name, message", [
    ("zero1_to_zero0", "saved with 2 data-parallel rank(s) under ZeRO stage 1, and this run has 1 under ZeRO stage "
                       "0; the data-parallel size can change only under ZeRO 0, or under the ZeRO 1 or 2 stage it "
                       "was saved with"),
    ("zero1_to_tp2", "saved with parallel.tensor=1 parallel.pipeline=1, but this run has parallel.tensor=2"),
    ("zero0_under_zero1", "saved with 1 data-parallel rank(s) under ZeRO stage 0, and this run has 2 under ZeRO "
                          "stage 1"),
])
def test_unsupported_layout_changes_are_refused_naming_the_fix(runs, name, message):
    for line in user_errors(runs["results"][name]):
        assert f"global_step{STOP}" in line and message in line, line
    fixes = {"zero1_to_zero0": "pass --deepspeed_config zero1",
             "zero1_to_tp2": "megamu-merge RUN_DIR --output merged.pt",
             "zero0_under_zero1": "pass --deepspeed_config zero0"}
    assert fixes[name] in runs["results"][name].ranks[0].output
    assert max(losses(runs["dirs"][name])) == STOP  # nothing trained


@pytest.mark.parametrize("saved, current", [
    (CheckpointLayout(2, 2, 2, 1), CheckpointLayout(2, 2, 1, 1)),
    (CheckpointLayout(2, 1, 1, 2), CheckpointLayout(2, 1, 2, 2)),
])
def test_zero_dp_changes_at_any_tp_and_pp_go_through_a_universal_conversion(saved, current):
    check_resumable(saved, current, "ckpt")
    assert needs_universal(saved, current)


@pytest.mark.parametrize("saved, current, fix", [
    (CheckpointLayout(1, 1, 2, 3), CheckpointLayout(1, 1, 1, 3), "resume with 2 data-parallel rank(s) (world size 2)"),
    (CheckpointLayout(2, 1, 2, 3), CheckpointLayout(2, 1, 1, 3), "resume with 2 data-parallel rank(s) (world size 4)"),
    (CheckpointLayout(1, 1, 2, 1), CheckpointLayout(1, 1, 1, 2), "pass --deepspeed_config zero1"),
])
def test_zero_dp_changes_without_a_universal_conversion_are_refused(saved, current, fix):
    """ZeRO 3, or another ZeRO stage."""
    with pytest.raises(CheckpointError, match="the data-parallel size can change only under ZeRO 0") as refused:
        check_resumable(saved, current, "ckpt")
    assert fix in str(refused.value)


def test_a_rank_that_cannot_see_the_pointer_stops_every_rank_naming_shared_storage(runs):
    pointer = f"{runs['dirs']['pointer_views']}/checkpoints/latest_complete"
    rank0, rank1 = user_errors(runs["results"]["pointer_views"], speaking=(0, 1))
    assert "rank 1 on " in rank1 and f"reads no pointer at {pointer}, but rank 0 on " in rank1, rank1
    assert "reads 'global_step3'" in rank1
    assert "rank(s) [1] on " in rank0 and pointer in rank0, rank0
    for line in (rank0, rank1):
        assert "must be on storage every node shares" in line
