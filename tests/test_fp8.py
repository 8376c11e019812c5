"""train.fp8: the hidden linears' matmuls run in FP8 through torchao, nothing else changes (parameters,
names, μP roles and multipliers, the embedding and readout); layers FP8 GEMMs cannot take are an error; and
a machine without FP8 tensor cores refuses the key with one `error:` line. torch's CPU `_scaled_mm` runs the
same FP8 matmul here, so the numerics are tested without a GPU."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from megamu.config import ConfigError, load_config
from megamu.model import build_model
from megamu.model.fp8 import use_fp8_matmuls
from megamu.model.layers import Readout
from scripts import script
from test_data_vocabulary import _assert_one_error_line
from test_smoke_run import SMALL

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

HIDDEN_LINEARS = {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}


def _cfg(*overrides: str):
    return load_config(None, ["model.vocab_size=100", "model.hidden_size=64", "model.n_heads=4", "model.n_kv_heads=2",
                              "model.n_layers=2", "model.seq_len=32", "mup.base_hidden_size=32", *overrides])


def _loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(tokens[:, :-1], labels=tokens[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_only_the_hidden_matmuls_change_and_stay_close_to_full_precision():
    reference, fp8 = build_model(_cfg()), build_model(_cfg())  # μP init is seeded: the same weights
    for model in (reference, fp8):  # μP's zero readout would hide every hidden layer from the loss
        torch.nn.init.normal_(model.layers[-1].weight, std=0.02, generator=torch.Generator().manual_seed(0))
    switched = use_fp8_matmuls(fp8)
    assert {name.split(".", 2)[2] for name in switched} == HIDDEN_LINEARS and len(switched) == 2 * 7
    # Same parameters, names, roles and multipliers: μP is untouched.
    assert [(n, p.mup_role) for n, p in fp8.named_parameters()] == \
           [(n, p.mup_role) for n, p in reference.named_parameters()]
    for ours, theirs in zip(fp8.modules(), reference.modules()):
        for multiplier in ("scale", "logit_mult", "input_mult"):
            assert getattr(ours, multiplier, None) == getattr(theirs, multiplier, None)
    assert isinstance(fp8.layers[-1], Readout) and not hasattr(fp8.layers[-1], "matmul")

    tokens = torch.randint(0, 100, (4, 33))
    with torch.no_grad():
        logits, logits8 = reference(tokens[:, :-1]), fp8(tokens[:, :-1])
    # e4m3 keeps 3 mantissa bits: a few % per matmul, far from zero (the FP8 path really runs) and far from O(1).
    assert 1e-3 < float((logits8 - logits).norm() / logits.norm()) < 0.1
    _, grads = _loss_and_grads(reference, tokens)
    _, grads8 = _loss_and_grads(fp8, tokens)
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(grads8[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.98, (name, float(cosine))


def test_a_layer_fp8_gemms_cannot_take_is_an_error_naming_it():
    model = build_model(_cfg("model.n_kv_heads=1", "model.n_heads=8"))  # k and v: 8 output features
    with pytest.raises(ConfigError, match=r"layers\.1\.attn\.k .*divisible by 16"):
        use_fp8_matmuls(model)


def test_a_machine_without_fp8_tensor_cores_refuses_train_fp8(tmp_path, tiny_tokenizer, tiny_dataset_prefix):
    result = subprocess.run([script("megamu-train"), "--config", "tiny", *SMALL, f"data.path={tiny_dataset_prefix}",
                             f"data.tokenizer_model={tiny_tokenizer.model_path}", f"train.out_dir={tmp_path / 'run'}",
                             "train.max_steps=1", "train.fp8=true"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    _assert_one_error_line(result, "train.fp8=true", "H100", "train.fp8=false")
