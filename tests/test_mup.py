"""μP rules: roles, groups, LR and weight-decay scaling, init scales, multipliers, and μP = SP at m = 1."""
import math

import pytest
import torch
from torch import nn

from megamu.config import load_config
from megamu.data.objectives import inputs_and_labels, objective_batch
from megamu.model import build_model, mup
from megamu.model.mup import ROLES

ARCHS = [(), ("model.arch=gpt2", "model.qk_norm=true"), ("model.n_kv_heads=2", "model.qk_norm=true"),
         ("model.arch=bert", "data.mask_token_id=3"), ("model.arch=t5", "data.sentinel_tokens=8"),
         ("model.arch=t5", "model.positions=rotary", "data.sentinel_tokens=8")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg_at(width: int, *overrides: str, base: int = 64):
    return load_config(None, ["model.vocab_size=64", f"model.hidden_size={width}", "model.n_heads=4",
                              "model.n_layers=2", "model.seq_len=16", f"mup.base_hidden_size={base}",
                              "train.weight_decay=0.1", *overrides])


def groups_by_name(model, cfg):
    return {g["name"]: g for g in mup.param_groups(model, cfg)}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_has_a_role_and_every_group_is_filled(arch):
    cfg = cfg_at(128, *arch)
    model = build_model(cfg)
    for name, param in model.named_parameters():
        assert getattr(param, "mup_role", None) in ROLES, name
    groups = groups_by_name(model, cfg)
    assert set(groups) == {"hidden", "embedding", "readout", "norm_bias"}
    assert all(g["params"] for g in groups.values())
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})
    by_role = mup.parameters_by_role(model)
    # Matrices in blocks are hidden; the first and last layers are not. t5's decoder blocks add cross-attention's
    # output; its one embedding serves encoder and decoder.
    outputs_per_layer = 5 if cfg.model.arch == "t5" else 2
    assert len(by_role["hidden_out"]) == outputs_per_layer * cfg.model.n_layers
    assert by_role["embedding"] == ["layers.0.tokens.weight"]
    assert by_role["readout"] == [f"layers.{len(model.layers) - 1}.weight"]


def test_a_parameter_without_a_role_is_refused():
    cfg = cfg_at(64)
    model = build_model(cfg)
    model.stray = nn.Linear(4, 4)  # created by a module that does not tag its parameters
    with pytest.raises(ValueError, match="stray.weight.*mup.assign_role"):
        mup.param_groups(model, cfg)
    with pytest.raises(ValueError, match="stray.weight"):
        mup.init_weights(model, cfg)


@pytest.mark.parametrize("width", [32, 256])
def test_lr_and_weight_decay_scale_with_width(width):
    cfg = cfg_at(width, "mup.scale_eps=true")
    groups = groups_by_name(build_model(cfg), cfg)
    m = width / 64
    hidden, embedding = groups["hidden"], groups["embedding"]
    assert hidden["lr"] / embedding["lr"] == pytest.approx(1 / m)
    assert embedding["lr"] == groups["readout"]["lr"] == groups["norm_bias"]["lr"] == cfg.train.lr
    for g in groups.values():
        assert g["lr"] == pytest.approx(cfg.train.lr * g["lr_mult"])
    assert hidden["lr"] * hidden["weight_decay"] == pytest.approx(cfg.train.lr * 0.1)  # width-independent
    assert embedding["weight_decay"] == groups["readout"]["weight_decay"] == groups["norm_bias"]["weight_decay"] == 0
    assert hidden["eps"] == pytest.approx(cfg.train.adam_eps / m)


def test_weight_decay_on_embeddings_is_configurable_and_sp_is_unscaled():
    cfg = cfg_at(256, "mup.wd_on_embeddings=true")
    groups = groups_by_name(build_model(cfg), cfg)
    assert groups["embedding"]["weight_decay"] == groups["readout"]["weight_decay"] == 0.1
    assert groups["norm_bias"]["weight_decay"] == 0
    sp = cfg_at(256, "mup.enabled=false")
    assert {g["lr_mult"] for g in mup.param_groups(build_model(sp), sp)} == {1.0}


def test_init_scales_follow_roles():
    width, n_layers, sigma = 512, 2, 0.02
    cfg = cfg_at(width, "mup.zero_query=true")
    model = build_model(cfg)
    m = width / 64
    block = model.layers[1]
    assert block.attn.k.weight.std().item() == pytest.approx(sigma / math.sqrt(m), rel=0.03)
    assert block.mlp.down.weight.std().item() == pytest.approx(sigma / math.sqrt(m * 2 * n_layers), rel=0.03)
    assert model.layers[0].tokens.weight.std().item() == pytest.approx(sigma, rel=0.03)
    assert torch.count_nonzero(block.attn.q.weight) == 0  # zero_query
    assert torch.count_nonzero(model.layers[-1].weight) == 0  # zero_readout (default)
    assert torch.all(block.attn_norm.weight == 1)
    shown = build_model(cfg_at(width, "mup.zero_readout=false")).layers[-1].weight
    assert shown.std().item() == pytest.approx(sigma, rel=0.03)


def test_forward_multipliers():
    cfg = cfg_at(256, "mup.output_mult=2.0", "mup.input_mult=3.0")
    assert mup.output_multiplier(cfg) == pytest.approx(2.0 / 4)
    assert mup.input_multiplier(cfg) == 3.0
    assert build_model(cfg).layers[-1].logit_mult == pytest.approx(0.5)
    # Default α_attn makes μP's α/d_head equal SP's 1/sqrt(d_head) at the base width, and 1/d_head-like beyond.
    assert mup.attention_scale(cfg_at(64)) == pytest.approx(1 / math.sqrt(16))
    assert mup.attention_scale(cfg_at(256)) == pytest.approx(math.sqrt(16) / 64)
    assert mup.attention_scale(cfg_at(256, "mup.enabled=false")) == pytest.approx(1 / 8)
    assert mup.attention_scale(cfg_at(256, "mup.attn_mult=1.0")) == pytest.approx(1 / 64)


def _two_adam_steps(cfg):
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(mup.param_groups(model, cfg), betas=(0.9, 0.95), eps=1e-8)
    tokens = torch.randint(0, 48, (2, 17), generator=torch.Generator().manual_seed(3))
    inputs, labels = inputs_and_labels(objective_batch(cfg, tokens, seed=0))  # masked for bert, spans for t5
    initial = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        optimizer.zero_grad()
        model(inputs, labels=labels).backward()
        optimizer.step()
    return initial, list(model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_mup_equals_sp_at_base_width(arch):
    same_init = ("mup.zero_readout=false", "train.lr=0.01")
    mup_init, mup_trained = _two_adam_steps(cfg_at(64, *arch, *same_init))
    sp_init, sp_trained = _two_adam_steps(cfg_at(64, *arch, *same_init, "mup.enabled=false"))
    assert all(torch.equal(a, b) for a, b in zip(mup_init, sp_init))
    assert all(torch.equal(a, b) for a, b in zip(mup_trained, sp_trained))
    assert not torch.equal(mup_init[1], mup_trained[1])  # the steps did move the weights


def test_mup_differs_from_sp_off_base_width():
    mup_init, mup_trained = _two_adam_steps(cfg_at(128, "mup.zero_readout=false"))
    sp_init, sp_trained = _two_adam_steps(cfg_at(128, "mup.zero_readout=false", "mup.enabled=false"))
    assert torch.equal(mup_init[0], sp_init[0])  # embedding: σ at every width
    assert not all(torch.equal(a, b) for a, b in zip(mup_init, sp_init))
