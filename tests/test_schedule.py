"""LR schedules: shapes (warmup, cosine, WSD, constant, final fraction) and μP ratios kept on the
real DeepSpeed engine's optimizer after several steps."""
from __future__ import annotations

import json

import pytest

from dist import run_script
from megamu.config import TrainConfig
from megamu.training.schedule import apply_lr, base_lr, lr_factor
from test_train_e2e import write_config


def train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": 100, "warmup_steps": 10, "lr": 1e-2, "min_lr_ratio": 0.1, **kw})


def test_linear_warmup_reaches_peak():
    t = train_cfg()
    assert [lr_factor(s, t) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(10, t) == pytest.approx(1.0)


def test_cosine_decays_monotonically_to_min_ratio():
    t = train_cfg(schedule="cosine")
    factors = [lr_factor(s, t) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert lr_factor(55, t) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: mid-point of the cosine
    assert lr_factor(100, t) == pytest.approx(0.1)
    assert base_lr(100, t) == pytest.approx(1e-3)


def test_wsd_is_flat_then_decays_linearly_over_decay_fraction():
    t = train_cfg(schedule="wsd", decay_fraction=0.2)
    assert all(lr_factor(s, t) == 1.0 for s in range(10, 80))
    decay = [lr_factor(s, t) for s in range(80, 100)]
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert steps == pytest.approx([steps[0]] * len(steps))  # linear
    assert decay[-1] == pytest.approx(0.1)


def test_constant_after_warmup():
    t = train_cfg(schedule="constant")
    assert {lr_factor(s, t) for s in range(10, 100)} == {1.0}


def test_apply_lr_multiplies_each_group_multiplier():
    groups = [{"lr_mult": 1.0, "lr": 0.0}, {"lr_mult": 0.25, "lr": 0.0}]
    apply_lr(groups, 2e-3)
    assert [g["lr"] for g in groups] == pytest.approx([2e-3, 5e-4])
    assert [g["lr_mult"] for g in groups] == [1.0, 0.25]


# Trains a few steps at width 4x the μP base and prints each optimizer group's (name, lr, lr_mult).
REPORT_GROUP_LRS = """
import json, sys
from megamu.config import load_config
from megamu.training.loop import Trainer
trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]))
trainer.run()
print("GROUPS " + json.dumps([[g["name"], g["lr"], g["lr_mult"]] for g in trainer.optimizer_step.param_groups]))
"""


@pytest.mark.parametrize("ds", ["zero3"])  # ZeRO 0-2 keep the same LRs: test_train_e2e checks equal losses
def test_mup_ratios_survive_steps_on_the_engine_optimizer(tmp_path, tiny_tokenizer, tiny_dataset_prefix, ds):
    config = write_config(str(tmp_path / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix,
                          str(tmp_path / "run"))
    steps = 4
    result = run_script(REPORT_GROUP_LRS, [config, "mup.base_hidden_size=8", f"train.max_steps={steps}",
                                           "train.warmup_steps=1", "train.eval_iters=0",
                                           f"train.deepspeed_config=ds_configs/{ds}.json"])
    assert result.ok, result.describe()
    line = next(l for l in result.ranks[0].output.splitlines() if l.startswith("GROUPS "))
    groups = {name: (lr, mult) for name, lr, mult in json.loads(line[len("GROUPS "):])}
    last_lr = base_lr(steps - 1, train_cfg(max_steps=steps, warmup_steps=1))
    assert groups["hidden"][1] == pytest.approx(1 / 4)  # μP: η/m with m = 32/8
    for name, (lr, mult) in groups.items():
        assert lr == pytest.approx(last_lr * mult), name
    assert groups["hidden"][0] / groups["embedding"][0] == pytest.approx(1 / 4)
