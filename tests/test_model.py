"""The transformer: shapes, sizes, FLOPs, RoPE, norms, attention scale, causality, padded vocabulary."""
import math

import pytest
import torch
import torch.nn.functional as F

from megamu.config import ConfigError, load_config
from megamu.model import build_model, flops_per_token, mup, param_counts
from megamu.model.layers import RMSNorm, RotaryEmbedding

VOCAB = 100  # pads to 128, so padded rows exist


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_cfg(*overrides: str):
    base = ["model.vocab_size=100", "model.hidden_size=64", "model.n_heads=4", "model.n_layers=2",
            "model.seq_len=16", "mup.base_hidden_size=32"]
    return load_config(None, base + list(overrides))


VARIANTS = {
    "llama": (),
    "llama_gqa_qknorm": ("model.n_kv_heads=2", "model.qk_norm=true"),
    "llama_mqa": ("model.n_kv_heads=1",),
    "gpt2": ("model.arch=gpt2",),
    "gpt2_qknorm": ("model.arch=gpt2", "model.qk_norm=true"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_and_sizes_match_config_formulas(variant):
    cfg = tiny_cfg(*VARIANTS[variant])
    model = build_model(cfg)
    tokens = torch.randint(0, VOCAB, (3, 16))
    assert model(tokens).shape == (3, 16, cfg.padded_vocab_size())
    loss = model(tokens, labels=tokens)
    assert loss.dim() == 0 and loss.dtype == torch.float32

    embedding_roles = ("embedding", "position")
    total = sum(p.numel() for p in model.parameters())
    non_embedding = sum(p.numel() for p in model.parameters() if p.mup_role not in embedding_roles)
    assert param_counts(cfg) == {"total": total, "non_embedding": non_embedding}
    attention_flops = 12 * cfg.model.n_layers * cfg.model.n_heads * cfg.head_dim * cfg.model.seq_len
    assert flops_per_token(cfg) == 6 * non_embedding + attention_flops


def test_architectures_differ_as_configured():
    llama = build_model(tiny_cfg("model.n_kv_heads=2"))
    gpt2 = build_model(tiny_cfg("model.arch=gpt2"))
    llama_attn, gpt2_attn = llama.layers[1].attn, gpt2.layers[1].attn
    assert llama_attn.k.weight.shape == (2 * 16, 64)  # 2 kv heads of head_dim 16
    assert llama_attn.rope is not None and gpt2_attn.rope is None
    assert all(p.mup_role != "bias" for p in llama.parameters())  # Llama: no biases
    assert gpt2.layers[0].positions is not None and llama.layers[0].positions is None
    assert gpt2.layers[1].mlp.up.bias is not None


def test_rope_real_arithmetic_equals_complex_reference():
    head_dim, seq_len, theta = 8, 12, 500.0
    rope = RotaryEmbedding(head_dim, theta, max_seq_len=seq_len)
    x = torch.randn(2, seq_len, 3, head_dim)
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    pairs = torch.view_as_complex(x.double().reshape(2, seq_len, 3, head_dim // 2, 2).contiguous())
    expected = torch.view_as_real(pairs * rotation).flatten(-2)
    torch.testing.assert_close(rope(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rope(x)[:, 1:], x[:, 1:])  # it does rotate


def _rope_at_long_positions(rope: RotaryEmbedding) -> torch.Tensor:
    x = torch.randn(1, rope.max_seq_len, 2, rope.head_dim, generator=torch.Generator().manual_seed(0))
    return rope(x)[:, -64:]  # positions near 8192, where bf16 angles would be off by whole radians


@pytest.mark.parametrize("convert", [
    lambda rope: rope.bfloat16(),
    lambda rope: rope.to(torch.bfloat16),
    lambda rope: rope.half().float(),  # a round trip through fp16 must not leave rounded tables behind
], ids=["bfloat16()", "to(bf16)", "half-then-float"])
def test_rope_tables_stay_fp32_when_the_module_is_cast(convert):
    reference = _rope_at_long_positions(RotaryEmbedding(64, 10000.0, max_seq_len=8192))
    rope = convert(RotaryEmbedding(64, 10000.0, max_seq_len=8192))
    assert rope.cos.dtype == rope.sin.dtype == torch.float32
    assert torch.equal(_rope_at_long_positions(rope), reference)
    assert "cos" not in rope.state_dict() and "sin" not in rope.state_dict()  # derived, never checkpointed


def test_rope_tables_are_built_after_materialising_from_meta():
    with torch.device("meta"):
        rope = RotaryEmbedding(64, 10000.0, max_seq_len=8192)
    assert rope.cos.is_meta
    rope.to_empty(device="cpu")
    assert torch.equal(_rope_at_long_positions(rope),
                       _rope_at_long_positions(RotaryEmbedding(64, 10000.0, max_seq_len=8192)))


def test_bf16_model_rotates_by_the_fp32_tables():
    model = build_model(tiny_cfg()).bfloat16()
    for block in model.layers[1:-2]:
        assert block.attn.rope.cos.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_rmsnorm_computes_in_fp32_and_returns_input_dtype():
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
    x = (torch.randn(4, 64) * 30).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    x64 = x.double()
    reference = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(out, reference.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["llama_gqa_qknorm", "gpt2"])
def test_bf16_model_keeps_activation_dtype_and_fp32_loss(variant):
    model = build_model(tiny_cfg(*VARIANTS[variant], "mup.zero_readout=false")).to(torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (2, 16))
    assert model(tokens).dtype == torch.bfloat16
    loss = model(tokens, labels=tokens)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("variant", ["llama_gqa_qknorm", "gpt2"])
def test_attention_uses_mup_scale_and_expands_kv_heads(variant):
    cfg = tiny_cfg(*VARIANTS[variant])
    attention = build_model(cfg).layers[1].attn
    x = torch.randn(2, 16, 64)
    batch, seq_len, hd = 2, 16, cfg.head_dim
    q = attention.q(x).view(batch, seq_len, -1, hd)
    k = attention.k(x).view(batch, seq_len, -1, hd)
    v = attention.v(x).view(batch, seq_len, -1, hd)
    if attention.q_norm is not None:
        q, k = attention.q_norm(q), attention.k_norm(k)
    if attention.rope is not None:
        q, k = attention.rope(q), attention.rope(k)
    group = cfg.model.n_heads // cfg.kv_heads
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * mup.attention_scale(cfg)
    scores = scores.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), float("-inf"))
    mixed = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, seq_len, -1)
    torch.testing.assert_close(attention(x), attention.o(mixed), rtol=1e-5, atol=1e-6)
    assert mup.attention_scale(cfg) != pytest.approx(1 / math.sqrt(hd))  # m=2: μP's 1/d scaling differs


@pytest.mark.parametrize("variant", ["llama_gqa_qknorm", "gpt2"])
def test_causality_future_tokens_do_not_change_past_logits(variant):
    cfg = tiny_cfg(*VARIANTS[variant], "mup.zero_readout=false")
    model = build_model(cfg)
    tokens = torch.randint(0, VOCAB, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % VOCAB
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=0)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_padded_vocab_rows_receive_no_probability(fused):
    cfg = tiny_cfg("mup.zero_readout=false", f"train.fused_cross_entropy={str(fused).lower()}")
    assert cfg.padded_vocab_size() > VOCAB
    model = build_model(cfg)
    tokens = torch.randint(0, VOCAB, (2, 16))
    loss = model(tokens, labels=tokens)
    with torch.no_grad():
        model.layers[-1].weight[VOCAB:] = 50.0  # padded rows: huge logits if they took part in the softmax
    torch.testing.assert_close(model(tokens, labels=tokens), loss, rtol=0, atol=0)
    logits = model(tokens)
    expected = F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB), tokens.reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("variant", ["llama_gqa_qknorm", "gpt2"])
def test_fused_loss_equals_plain_loss_and_gradients(variant):
    models = {fused: build_model(tiny_cfg(*VARIANTS[variant], "mup.zero_readout=false", "mup.output_mult=3",
                                          f"train.fused_cross_entropy={str(fused).lower()}"))
              for fused in (True, False)}
    tokens = torch.randint(0, VOCAB, (2, 17))
    labels = tokens[:, 1:].clone()
    labels[0, :5] = -100
    losses = {fused: model(tokens[:, :-1], labels=labels) for fused, model in models.items()}
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-6, atol=1e-6)
    for loss in losses.values():
        loss.backward()
    plain = dict(models[False].named_parameters())
    for name, param in models[True].named_parameters():
        torch.testing.assert_close(param.grad, plain[name].grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert models[True].layers[-1].weight.grad.abs().sum() > 0


def test_init_depends_on_seed_and_name_not_on_construction():
    two_layers = build_model(tiny_cfg())
    three_layers = build_model(tiny_cfg("model.n_layers=3"))
    # Same seed and qualified name → same tensor, whatever else the model holds.
    assert torch.equal(two_layers.layers[1].attn.q.weight, three_layers.layers[1].attn.q.weight)
    assert torch.equal(two_layers.layers[0].tokens.weight, three_layers.layers[0].tokens.weight)
    assert not torch.equal(two_layers.layers[1].attn.q.weight, two_layers.layers[2].attn.q.weight)
    reseeded = build_model(tiny_cfg("train.seed=7"))
    assert not torch.equal(two_layers.layers[1].attn.q.weight, reseeded.layers[1].attn.q.weight)


def test_build_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_model(load_config(None, ["model.hidden_size=64"]))
    with pytest.raises(ConfigError, match="model.n_heads"):
        build_model(tiny_cfg("model.hidden_size=60"))  # RoPE needs an even head_dim (60/4 = 15)
    with pytest.raises(ValueError, match="seq_len"):
        build_model(tiny_cfg())(torch.zeros(1, 17, dtype=torch.long))
