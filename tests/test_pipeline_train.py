"""Pipeline parallelism through the real trainer (`python -m megamu.train` on 2 or 4 gloo ranks).

DESIGN.md invariant 2 for PP: PP=2 at ZeRO 0 and 1 (even and uneven block splits), PP=2 × TP=2 and
PP=2 × DP=2 give the single-process losses, gradient norms and validation loss over 10 steps, each step
accumulating several micro batches; pipeline-invariant init (every stage's weights, TP-sharded or not, are
the PP=1 model's under their logical names); exact resume under PP; and a PP×TP checkpoint merged by
megamu-merge equals the single-process run's weights.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dist import run_script, run_train
from megamu.checkpoint import load_model_shards, read_pointer
from megamu.cli.merge import main as merge_main
from megamu.config import load_config
from megamu.model import parameter_layout
from test_tp_train import assert_same_trajectory
from test_train_e2e import losses, read_records, write_config

STEPS = 10
REL_TOL = 1e-5
GRAD_NORM_REL_TOL = 1e-4  # as for TP: a norm sums squares over ranks in another order than one process
# 3 blocks: an even split is [2, 1]; global batch 8 of micro batches 2 accumulates 4 (DP=1) or 2 (DP=2).
MODEL = ["model.n_layers=3", "model.n_kv_heads=2", "model.qk_norm=true", f"train.max_steps={STEPS}",
         "train.eval_interval=0"]
PP2 = ["parallel.pipeline=2"]

LAYOUTS = {  # name: (overrides, processes, DeepSpeed config)
    "pp1": ([], 1, "zero1"),
    "pp2-zero0": (PP2, 2, "zero0"),
    "pp2-uneven-zero1": (PP2 + ["parallel.pipeline_blocks=[1,2]"], 2, "zero1"),
    "pp2xtp2": (PP2 + ["parallel.tensor=2"], 4, "zero1"),
    "pp2xdp2": (PP2, 4, "zero1"),
}


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_tokenizer, tiny_dataset_prefix) -> str:
    root = tmp_path_factory.mktemp("pp_train")
    return write_config(str(root / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix, str(root / "runs"))


def train(config: str, out_dir, name: str, *extra: str):
    overrides, nprocs, ds = LAYOUTS[name]
    return run_train(["--config", config, f"train.out_dir={out_dir}", *MODEL, *overrides, *extra,
                      "--deepspeed_config", f"ds_configs/{ds}.json"], nprocs, timeout=600)


@pytest.fixture(scope="module")
def run_dirs(config, tmp_path_factory) -> dict[str, str]:
    """Every layout trained at once: most of a run is start-up (imports), which overlaps well."""
    root = tmp_path_factory.mktemp("pp_runs")
    with ThreadPoolExecutor(3) as pool:  # at most ~8 processes on the 2 cores at once
        results = dict(zip(LAYOUTS, pool.map(lambda name: train(config, root / name, name), LAYOUTS)))
    for name, result in results.items():
        assert result.ok, f"{name}:\n{result.describe()}"
    return {name: str(root / name) for name in LAYOUTS}


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "pp1"])
def test_pp_layouts_match_single_process_losses_grad_norms_and_eval(layout, run_dirs):
    _, nprocs, _ = LAYOUTS[layout]
    meta = read_records(run_dirs[layout], "meta")[0]
    assert meta["pp"] == 2 and meta["tp"] * meta["dp"] * 2 == nprocs
    assert_same_trajectory(run_dirs[layout], run_dirs["pp1"], "loss", REL_TOL, STEPS)
    assert_same_trajectory(run_dirs[layout], run_dirs["pp1"], "grad_norm", GRAD_NORM_REL_TOL, STEPS)
    (got,), (want,) = read_records(run_dirs[layout], "eval"), read_records(run_dirs["pp1"], "eval")
    assert math.isclose(got["val_loss"], want["val_loss"], rel_tol=REL_TOL) and got["val_bpb"] is not None


def test_exact_resume_under_pp(config, run_dirs, tmp_path):
    run = tmp_path / "resume"
    first = train(config, run, "pp2-zero0", "train.stop_at_step=4")
    assert first.ok, first.describe()
    assert max(losses(str(run))) == 4
    second = train(config, run, "pp2-zero0", "train.resume=true")
    assert second.ok, second.describe()
    assert losses(str(run)) == losses(run_dirs["pp2-zero0"])  # bitwise, step for step


def test_merged_pp2xtp2_checkpoint_equals_single_process_weights(run_dirs, tmp_path, capsys):
    merged_path = str(tmp_path / "merged.pt")
    assert merge_main([run_dirs["pp2xtp2"], "--output", merged_path]) == 0
    assert "2 TP shards x 2 pipeline stages" in capsys.readouterr().out
    merged = torch.load(merged_path)
    ckpt = os.path.join(run_dirs["pp1"], "checkpoints")
    (want,) = load_model_shards(ckpt, read_pointer(ckpt))
    assert merged.keys() == want.keys()
    for name, tensor in want.items():  # tolerance: see test_tp_train's merge test
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


# Each rank builds its pipeline stage and compares every parameter, under its logical name, with this TP
# rank's slice of the PP=1 model's; it prints the names it checked.
INIT_CHECK = """
import json, sys
import torch
from megamu.config import load_config
from megamu.model import build_model
from megamu.training.pipeline_module import TransformerPipe
from megamu.parallel import initialize_parallel
from megamu.parallel.pipeline_grid import check_pipeline_grid, pipeline_topology

base, layout = json.loads(sys.argv[1]), json.loads(sys.argv[2])
cfg = load_config(None, base + layout)
state = initialize_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
pipe = TransformerPipe(cfg, pipeline_topology(state.layout), state.get_tensor_model_parallel_group())
check_pipeline_grid(pipe.mpu(), state)
dense = dict(build_model(load_config(None, base)).named_parameters())
checked = []
for name, param in pipe.logical_named_parameters():
    want = dense[name].detach()
    if param.partition_dim is not None:
        want = want.chunk(cfg.parallel.tensor, dim=param.partition_dim)[state.tp_rank]
    assert torch.equal(param.detach(), want), name
    checked.append(name)
print("CHECKED " + json.dumps(checked))
"""

INIT_BASE = ["model.hidden_size=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
             "model.qk_norm=true", "model.seq_len=16", "model.vocab_size=512", "mup.base_hidden_size=16",
             "mup.zero_readout=false", "train.seed=11"]


@pytest.mark.parametrize("layout, nprocs", [(PP2, 2), (PP2 + ["parallel.tensor=2"], 4)], ids=["pp2", "pp2xtp2"])
def test_pipeline_stages_init_to_the_single_process_weights(layout, nprocs):
    result = run_script(INIT_CHECK, [json.dumps(INIT_BASE), json.dumps(layout)], nprocs)
    assert result.ok, result.describe()
    checked = set()
    for rank in result.ranks:
        (line,) = [line for line in rank.output.splitlines() if line.startswith("CHECKED ")]
        checked |= set(json.loads(line.removeprefix("CHECKED ")))
    assert checked == set(parameter_layout(load_config(None, INIT_BASE)))


# Under PP=2 only the first stage's gradients turn NaN (steps 2 and 4 onwards): the last stage, whose
# gradients are finite, must skip the same steps, since the gate's verdict is agreed by every rank.
INJECT_NAN_GRAD_ON_STAGE_0 = """
import sys
import megamu.training.pipeline_module as pipeline
from megamu.train import main
NAN_CALLS = {2} | set(range(4, 100))
class Poisoned(pipeline.TransformerPipe):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        calls = [0]
        def poison_grad(grad):
            calls[0] += 1
            return grad * float("nan") if calls[0] in NAN_CALLS else grad
        if self.stage_id == 0:
            next(self.parameters()).register_hook(poison_grad)
pipeline.TransformerPipe = Poisoned
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("zero", [0, 1])
def test_a_non_finite_gradient_on_one_stage_skips_the_step_on_every_stage(config, tmp_path, zero):
    result = run_script(INJECT_NAN_GRAD_ON_STAGE_0,
                        ["--config", config, f"train.out_dir={tmp_path / 'run'}", *MODEL, *PP2,
                         "train.micro_batch_size=8", "train.eval_iters=0", "train.max_bad_steps=2",
                         "--deepspeed_config", f"ds_configs/zero{zero}.json"], 2)
    assert result.returncodes == [3, 3], result.describe()
    train = read_records(str(tmp_path / "run"), "train")
    assert all(math.isfinite(r["loss"]) for r in train)
    assert [r["skipped_steps"] for r in train] == [0, 1, 1, 2, 3]
    assert train[1]["grad_norm"] is None and math.isfinite(train[2]["grad_norm"])
    assert train[2]["loss"] < train[0]["loss"]
