"""Non-finite steps: a NaN loss is skipped (no update) and counted; `train.max_bad_steps` in a row
stop the run with a checkpoint and exit code 3. NaNs are injected with a forward hook on the
model in a real `python -m megamu.train` process."""
from __future__ import annotations

import glob
import math

import pytest
import torch

from dist import run_script, run_train
from megamu.training.guards import BadStepCounter
from megamu.training.step import NonFiniteStepGate
from test_train_e2e import MAX_STEPS, read_records, write_config

# Forward calls (= steps here: one micro batch per step, no evaluation) whose loss becomes NaN.
INJECT_NAN = """
import sys
import megamu.model
from megamu.train import main
NAN_CALLS = {2} | set(range(4, 100))
build_model = megamu.model.build_model
def build_poisoned(cfg, *tp_group):
    model = build_model(cfg, *tp_group)
    calls = [0]
    def poison(module, inputs, output):
        calls[0] += 1
        return output * float("nan") if calls[0] in NAN_CALLS else output
    model.register_forward_hook(poison)
    return model
megamu.model.build_model = build_poisoned
sys.exit(main(sys.argv[1:]))
"""


def test_nan_steps_are_skipped_counted_and_stop_the_run(tmp_path, tiny_tokenizer, tiny_dataset_prefix):
    config = write_config(str(tmp_path / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix,
                          str(tmp_path / "run"))
    result = run_script(INJECT_NAN, ["--config", config, "train.micro_batch_size=8", "train.eval_iters=0",
                                     "train.max_bad_steps=2", "train.save_interval=1",
                                     "--deepspeed_config", "ds_configs/zero0.json"])
    assert result.returncodes == [3], result.describe()
    output = result.ranks[0].output
    assert "2 consecutive steps with non-finite loss" in output
    train = read_records(str(tmp_path / "run"), "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert train[1]["loss"] is None and train[1]["skipped_steps"] == 1  # step 2: skipped, counted
    assert math.isfinite(train[2]["loss"]) and train[2]["skipped_steps"] == 1  # step 3 trains on
    assert train[2]["loss"] < train[0]["loss"]
    assert train[4]["skipped_steps"] == 3  # steps 4 and 5 in a row: stop
    # Saved every step, except while non-finite steps run (2, 4): the pointer keeps step 3, from before the
    # streak that stopped the run, and the weights at the stop are kept aside under another name.
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest_complete").read_text().strip() == "global_step3"
    assert sorted(p.name for p in ckpt.glob("global_step*")) == ["global_step1", "global_step3",
                                                                   "global_step5_diverged"]
    assert output.count("checkpoint postponed while steps are non-finite") == 2
    assert "saved as global_step5_diverged" in output and "continues from checkpoint global_step3" in output
    # The advised resume (the poison gone) continues from step 3, not from the diverged weights.
    resumed = run_train(["--config", config, "train.micro_batch_size=8", "train.eval_iters=0", "train.resume=true",
                         "--deepspeed_config", "ds_configs/zero0.json"])
    assert resumed.returncodes == [0], resumed.describe()
    assert "resumed from global_step3" in resumed.ranks[0].output
    continued = read_records(str(tmp_path / "run"), "train")[5:]  # after the diverged run's five records
    assert [r["step"] for r in continued] == list(range(4, MAX_STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["skipped_steps"] == 1 for r in continued)  # step 3's count


# The same steps, but the loss stays finite and one weight's gradient becomes NaN in backward.
INJECT_NAN_GRAD = INJECT_NAN.replace("""    model.register_forward_hook(poison)""", """    weight = next(model.parameters())
    def poison_grad(grad):
        calls[0] += 1
        return grad * float("nan") if calls[0] in NAN_CALLS else grad
    weight.register_hook(poison_grad)""")


@pytest.mark.parametrize("stage", [0, 1])
def test_nan_gradients_with_a_finite_loss_are_skipped(tmp_path, tiny_tokenizer, tiny_dataset_prefix, stage):
    """ZeRO 0: the loop's grad norm flags the step; ZeRO 1: DeepSpeed's (the gate reads it, no extra pass)."""
    config = write_config(str(tmp_path / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix,
                          str(tmp_path / "run"))
    result = run_script(INJECT_NAN_GRAD, ["--config", config, "train.micro_batch_size=8", "train.eval_iters=0",
                                          "train.max_bad_steps=2", "--deepspeed_config", f"ds_configs/zero{stage}.json"])
    assert result.returncodes == [3], result.describe()
    train = read_records(str(tmp_path / "run"), "train")
    assert all(math.isfinite(r["loss"]) for r in train)  # only the gradients were poisoned
    assert [r["skipped_steps"] for r in train] == [0, 1, 1, 2, 3]
    assert train[1]["grad_norm"] is None and math.isfinite(train[2]["grad_norm"])
    assert train[2]["loss"] < train[0]["loss"]  # the skipped update left the weights usable


# Prints, after every step, a digest of what an update changes: the innermost optimizer's (fp32 master)
# weights and AdamW state.
DIGEST_STEPS = """
import hashlib
import torch
from megamu.training import step as step_module
call = step_module.OptimizerStep.__call__
def digest(optimizer):
    tensors = [p for g in optimizer.param_groups for p in g["params"]]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return hashlib.sha1(b"".join(t.detach().float().numpy().tobytes() for t in tensors)).hexdigest()
def digesting_call(self, step, batches):
    outcome = call(self, step, batches)
    print(f"DIGEST {step + 1} {digest(self.gate.optimizer)}", flush=True)
    return outcome
step_module.OptimizerStep.__call__ = digesting_call
"""


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_bf16_skips_count_once_keep_the_weights_and_stop_the_run(tmp_path, tiny_tokenizer, tiny_dataset_prefix,
                                                                 stage, poison):
    """In bf16 DeepSpeed's wrapper (ZeRO 0: FP16_UnfusedOptimizer, ZeRO 1: BF16_Optimizer) skips these steps
    before megamu's gate sees them; the loop must still count each once and stop after two in a row."""
    config = write_config(str(tmp_path / "tiny.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix,
                          str(tmp_path / "run"))
    script = DIGEST_STEPS + (INJECT_NAN if poison == "loss" else INJECT_NAN_GRAD)
    result = run_script(script, ["--config", config, "train.dtype=bf16", "train.micro_batch_size=8",
                                 "train.eval_iters=0", "train.max_bad_steps=2",
                                 "--deepspeed_config", f"ds_configs/zero{stage}.json"])
    assert result.returncodes == [3], result.describe()
    output = result.ranks[0].output
    train = read_records(str(tmp_path / "run"), "train")
    assert [r["skipped_steps"] for r in train] == [0, 1, 1, 2, 3]  # steps 2, 4, 5: each counted once
    assert [r["grad_norm"] is None for r in train] == [False, True, False, True, True]  # non-finite: null
    assert [r["loss"] is None for r in train] == [False, poison == "loss", False, poison == "loss", poison == "loss"]
    assert output.count("update skipped") == 3
    # Logged with the step's own non-finite norm: ZeRO 0 megamu's (NaN), ZeRO 1 DeepSpeed's (inf for any).
    norm = "nan" if stage == 0 else "inf"
    assert all(f"step {s}: non-finite" in output and f"grad norm {norm}); update skipped" in output for s in (2, 4, 5))
    digests = dict(line.split()[1:] for line in output.splitlines() if line.startswith("DIGEST "))
    assert digests["1"] == digests["2"] != digests["3"] == digests["4"] == digests["5"]  # skipped: no update
    assert train[2]["loss"] < train[0]["loss"]
    # The stop saved step 5's weights (under the tag the loop gives a diverged run).
    assert glob.glob(str(tmp_path / "run" / "checkpoints" / "global_step5_diverged" / "mp_rank_00_model_states.pt"))


def test_gate_skips_the_update_when_loss_is_bad_or_grads_are_not_finite():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    gate = NonFiniteStepGate(optimizer, group=None)

    weight.grad = torch.ones(3)
    gate.begin_step(loss_is_bad=True)
    optimizer.step()
    assert gate.skipped_last_step and torch.equal(weight.detach(), torch.ones(3))

    weight.grad = torch.tensor([1.0, float("inf"), 1.0])
    gate.begin_step(loss_is_bad=False)
    optimizer.step()
    assert gate.skipped_last_step and torch.equal(weight.detach(), torch.ones(3))

    weight.grad = torch.ones(3)
    gate.begin_step(loss_is_bad=False)
    optimizer.step()
    assert not gate.skipped_last_step and torch.equal(weight.detach(), torch.zeros(3))


def test_gate_trusts_a_known_grad_norm_instead_of_scanning_the_gradients():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    wrapper_norm = [None]
    gate = NonFiniteStepGate(optimizer, group=None, step_grad_norm=lambda: wrapper_norm[0])

    weight.grad = torch.ones(3)
    gate.begin_step(loss_is_bad=False, grad_norm=float("nan"))  # the loop's norm says non-finite
    optimizer.step()
    assert gate.skipped_last_step and torch.equal(weight.detach(), torch.ones(3))

    wrapper_norm[0] = torch.tensor(float("inf"))  # the ZeRO wrapper's norm for this step
    gate.begin_step(loss_is_bad=False)
    optimizer.step()
    assert gate.skipped_last_step and torch.equal(weight.detach(), torch.ones(3))

    wrapper_norm[0] = None  # no norm this step: the gate scans the gradients itself
    weight.grad = torch.tensor([1.0, float("nan"), 1.0])
    gate.begin_step(loss_is_bad=False)
    optimizer.step()
    assert gate.skipped_last_step

    weight.grad = torch.ones(3)
    gate.begin_step(loss_is_bad=False, grad_norm=3.0 ** 0.5)
    optimizer.step()
    assert not gate.skipped_last_step and torch.equal(weight.detach(), torch.zeros(3))


def test_bad_step_counter_needs_consecutive_steps():
    counter = BadStepCounter(max_consecutive=2)
    assert [counter.record(b) for b in (True, False, True, True)] == [False, False, False, True]
