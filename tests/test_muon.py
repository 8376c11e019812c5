"""Muon (train.optimizer=muon): DeepSpeed's MuonWithAuxAdam inside ZeRO 1 orthogonalises the updates
of μP's hidden matrices, and only theirs; embeddings, readout and norms take AdamW steps. Its μP rule
(hidden LR η at every width, not Adam's η/m) keeps the coordinate check through the real engine flat.

One optimizer step from zero momentum: Muon's update of a hidden matrix is lr · Newton-Schulz(grad),
whose singular values are pushed towards one value (largest / median 1.2-1.6 here), while Adam's first
update is lr · sign(grad), whose spectrum keeps the gradient's spread (largest / median 2.3-5.6). The
AdamW run is the control that shows the check can fail.
TORCHDYNAMO_DISABLE=1 runs DeepSpeed's torch.compile'd Newton-Schulz eagerly (compiling takes ~1 min on CPU).
"""
from __future__ import annotations

import json

import pytest

from dist import run_script
from test_train_e2e import write_config

# One step; prints, per parameter, the spread (largest / median singular value) of its update and max |update|.
ONE_STEP_UPDATES = """
import json, sys, torch
from megamu.config import load_config
from megamu.training.loop import Trainer
trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]))
module = trainer.engine.module
before = {n: p.detach().clone() for n, p in module.named_parameters()}
trainer.run()
report = {}
for name, p in module.named_parameters():
    delta = (p.detach() - before[name]).double()
    s = torch.linalg.svdvals(delta) if delta.ndim == 2 else None
    report[name] = {"role": p.mup_role, "max_abs": delta.abs().max().item(),
                    "spread": (s.max() / s.median()).item() if s is not None else None}
print("UPDATES " + json.dumps(report))
"""


def one_step_updates(tmp_path, tokenizer, prefix, optimizer: str) -> dict:
    config = write_config(str(tmp_path / "tiny.yaml"), tokenizer.model_path, prefix, str(tmp_path / "run"))
    lr = 1e-3
    result = run_script(ONE_STEP_UPDATES, [config, f"train.optimizer={optimizer}", "train.max_steps=1",
                                           "train.warmup_steps=0", "train.schedule=constant", f"train.lr={lr}",
                                           "train.weight_decay=0", "train.grad_clip=0", "train.eval_iters=0",
                                           "mup.base_hidden_size=32",
                                           # zero-init readout or query would leave hidden gradients at 0 in step 1
                                           "mup.zero_readout=false", "mup.zero_query=false", "train.deepspeed_config=ds_configs/zero1.json"],
                        extra_env={"TORCHDYNAMO_DISABLE": "1"})
    assert result.ok, result.describe()
    line = next(l for l in result.ranks[0].output.splitlines() if l.startswith("UPDATES "))
    return json.loads(line[len("UPDATES "):])


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_muon_orthogonalises_hidden_matrices_only(tmp_path, tiny_tokenizer, tiny_dataset_prefix, optimizer):
    updates = one_step_updates(tmp_path, tiny_tokenizer, tiny_dataset_prefix, optimizer)
    hidden = {n: u for n, u in updates.items() if u["role"] in ("hidden_in", "hidden_out", "query")}
    assert hidden, "no hidden matrix found"
    spreads = [u["spread"] for u in hidden.values()]
    if optimizer == "muon":
        assert max(spreads) < 1.8, [(n, round(u["spread"], 2)) for n, u in hidden.items()]
    else:
        assert min(spreads) > 2.0, [(n, round(u["spread"], 2)) for n, u in hidden.items()]
    # Adam's first step moves every element with a gradient by exactly lr; embedding and readout stay on AdamW.
    for name, u in updates.items():
        if u["role"] in ("embedding", "readout"):
            assert u["max_abs"] == pytest.approx(1e-3, rel=1e-3), (name, u)


# Coordinate check through the real engine (megamu.scaling.engine_coord_check): slopes of log mean|ΔW·x| vs
# log width per hidden matrix after 3 steps, at the width rule's widths 64-512 from a 64-wide proxy.
ENGINE_CHECK = """
import json, sys
from megamu.config import load_config
from megamu.model import mup
from megamu.scaling import coord_check, engine_coord_check
from megamu.scaling.widths import config_at_width
rule, overrides = sys.argv[1], sys.argv[2:]
if rule == "adam_rule_for_muon":  # the broken rule: Muon's hidden LR shrunk like Adam's
    mup.hidden_lr_mult = lambda cfg: 1.0 / mup.width_mult(cfg)
proxy = load_config(None, overrides)
configs = [config_at_width(proxy, width) for width in (64, 128, 256, 512)]
batches = coord_check.token_batches(proxy, 3, batch_size=4)
probe = coord_check.token_batches(proxy, 1, batch_size=4, seed=99)[0]
result = engine_coord_check.run_engine_coord_check(configs, 3, batches, probe)
assert result["quantity"] == "delta_w_x" and result["optimizer"] == proxy.train.optimizer
print("SLOPES " + json.dumps(coord_check.slopes(result, 3)))
"""


def engine_check_slopes(optimizer: str, rule: str, lr: float) -> dict[str, float]:
    overrides = ["model.vocab_size=32", "model.n_layers=2", "model.n_heads=4", "model.seq_len=16",
                 "model.hidden_size=64", "mup.base_hidden_size=64", f"train.optimizer={optimizer}", f"train.lr={lr}",
                 "train.warmup_steps=0", "train.schedule=constant", "train.micro_batch_size=4",
                 "train.global_batch_size=4", "train.grad_clip=0", "train.max_steps=3",
                 "mup.zero_readout=false"]  # a zero readout would leave the hidden matrices no gradient in step 1
    result = run_script(ENGINE_CHECK, [rule, *overrides], extra_env={"TORCHDYNAMO_DISABLE": "1"})
    assert result.ok, result.describe()
    line = next(l for l in result.ranks[0].output.splitlines() if l.startswith("SLOPES "))
    slopes = json.loads(line[len("SLOPES "):])
    assert len(slopes) == 2 * 7, slopes  # q, k, v, o, gate, up, down in each of the 2 blocks
    return slopes


@pytest.mark.parametrize("optimizer, rule, lr", [("muon", "mup", 1e-2), ("adamw", "mup", 3e-3)])
def test_engine_coordinate_check_is_flat_under_each_optimizers_mup_rule(optimizer, rule, lr):
    slopes = engine_check_slopes(optimizer, rule, lr)
    assert max(abs(s) for s in slopes.values()) < 0.3, slopes  # measured ≤ 0.14 (Muon), ≤ 0.21 (AdamW)


def test_engine_coordinate_check_fails_when_muon_gets_adams_hidden_lr():
    slopes = engine_check_slopes("muon", "adam_rule_for_muon", 1e-2)
    assert max(slopes.values()) < -0.7, slopes  # measured about -1.1: updates vanish like 1/m
