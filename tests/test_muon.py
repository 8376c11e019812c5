"""Muon (train.optimizer=muon): DeepSpeed's MuonWithAuxAdam inside ZeRO 1 orthogonalises the updates
of μP's hidden matrices, and only theirs; embeddings, readout and norms take AdamW steps.

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
module = trainer.model.engine.module
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
