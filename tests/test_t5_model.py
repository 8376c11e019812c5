"""model.arch=t5: the encoder-decoder's masks (bidirectional encoder, causal decoder, cross-attention reading
only the encoder), T5's relative-position buckets, sizes and FLOPs as counted, recomputation, config refusals.
(μP ≡ SP, roles, TP=2 = TP=1 and the coordinate check cover t5 in test_mup, test_tp_model, test_coord_check.)"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megamu.config import ConfigError, load_config, span_layout
from megamu.model import build_model, flops_per_token, param_counts
from megamu.model.layers import CrossAttention, DecoderBlock, RelativePositionBias

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 120  # 100 text ids and 20 sentinels
TEXT = VOCAB - 20


def tiny_cfg(*overrides: str):
    base = ["model.arch=t5", f"model.vocab_size={VOCAB}", "data.sentinel_tokens=20", "model.hidden_size=32",
            "model.n_heads=4", "model.n_layers=2", "model.seq_len=40", "mup.base_hidden_size=16",
            "mup.zero_readout=false", "train.fused_cross_entropy=false"]
    return load_config(None, base + list(overrides)).validate(check_files=False)


def random_inputs(cfg, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TEXT, (batch, 2, cfg.model.seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("positions", ["relative", "rotary"])
def test_encoder_sees_both_ways_decoder_only_back_and_cross_attention_only_the_encoder(positions):
    cfg = tiny_cfg(f"model.positions={positions}")
    layout = span_layout(cfg)
    model = build_model(cfg).eval()
    inputs = random_inputs(cfg)
    logits = model(inputs)
    assert logits.shape == (2, layout.decoder_len, cfg.padded_vocab_size())

    def changed(row: int, position: int) -> torch.Tensor:
        other = inputs.clone()
        other[:, row, position] = (other[:, row, position] + 1) % TEXT
        return (model(other) - logits).abs().amax(dim=(0, 2))  # per decoder position

    # The last encoder token reaches every decoder position: bidirectional encoder, full cross-attention.
    assert (changed(0, layout.encoder_len - 1) > 0).all()
    # Decoder token t changes predictions at t and after only.
    t = layout.decoder_len // 2
    difference = changed(1, t)
    assert (difference[:t] == 0).all() and (difference[t:] > 0).all()
    # The filler beyond the layout's lengths is never read.
    assert (changed(0, layout.encoder_len) == 0).all() and (changed(1, layout.decoder_len) == 0).all()
    # The encoder's output does not depend on the decoder's tokens.
    memory = model.encode(inputs[:, 0, :layout.encoder_len])
    assert torch.equal(memory, model.encode(inputs[:, 0, :layout.encoder_len]))
    cross = [module for module in model.modules() if isinstance(module, CrossAttention)]
    assert len(cross) == cfg.model.n_layers and all(c.rope is None and not c.causal for c in cross)


def test_relative_position_buckets_are_t5s():
    encoder = RelativePositionBias(4, bidirectional=True)  # 32 buckets: 16 per direction, 8 of them exact
    buckets = encoder.buckets(1, 300)[0]  # key offsets 0 .. 299 from query 0: keys after it, the upper half
    assert buckets[:8].tolist() == [0] + list(range(17, 24))  # short distances each have their own bucket
    assert buckets[1:].min() == 17 and buckets.max() == 31 and buckets[128:].eq(31).all()  # far ones share
    assert (buckets[1:] - buckets[:-1]).min() >= 0  # farther is never a nearer bucket
    backward = encoder.buckets(300, 1)[:, 0]  # query i, key 0: offset -i, the other half of the table
    assert backward[:8].tolist() == list(range(8)) and backward.max() == 15
    decoder = RelativePositionBias(4, bidirectional=False)  # 32 buckets, all looking back, 16 exact
    looking_back = decoder.buckets(300, 1)[:, 0]
    assert looking_back[:16].tolist() == list(range(16)) and looking_back.max() == 31
    assert decoder.buckets(1, 5)[0].eq(0).all()  # the future (masked anyway) shares bucket 0
    assert encoder(3, 5).shape == (1, 4, 3, 5)


@pytest.mark.parametrize("positions", ["relative", "rotary"])
def test_sizes_and_flops_are_as_counted(positions):
    cfg = tiny_cfg(f"model.positions={positions}")
    model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    non_embedding = sum(p.numel() for p in model.parameters() if p.mup_role not in ("embedding", "position"))
    assert param_counts(cfg) == {"total": total, "non_embedding": non_embedding}
    assert sum(isinstance(m, DecoderBlock) for m in model.modules()) == cfg.model.n_layers
    # The weights' FLOPs of a forward and backward, as torch counts the linear layers' matmuls, against the
    # formula less its attention-score term (the formula also counts the norms' few parameters: hence a
    # tolerance, far below the 6% that taking the encoder's keys and values at the decoder's length costs).
    layout, m = span_layout(cfg), cfg.model
    scores = 12 * m.n_layers * m.n_heads * cfg.head_dim * (layout.encoder_len + layout.decoder_len) ** 2
    scores -= 12 * m.n_layers * m.n_heads * cfg.head_dim * layout.encoder_len * layout.decoder_len
    inputs = random_inputs(cfg, batch=1)
    counter = FlopCounterMode(display=False)
    with counter:
        model(inputs, labels=inputs[:, 1]).backward()
    matmuls = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    assert matmuls == pytest.approx(flops_per_token(cfg) * m.seq_len - scores, rel=0.01)


@pytest.mark.parametrize("checkpointing", ["full", "selective"])
def test_recomputation_gives_the_same_loss_and_gradients(checkpointing):
    inputs = random_inputs(tiny_cfg())
    results = []
    for mode in ("none", checkpointing):
        model = build_model(tiny_cfg("model.dropout=0.1", f"train.activation_checkpointing={mode}"))
        torch.manual_seed(3)  # the same dropout masks, which recomputation must replay
        loss = model(inputs, labels=inputs[:, 1])
        loss.backward()
        results.append((loss, {name: p.grad for name, p in model.named_parameters()}))
    (loss, grads), (recomputed_loss, recomputed_grads) = results
    assert torch.equal(loss, recomputed_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_bf16_model_keeps_activation_dtype_and_fp32_loss():
    cfg = tiny_cfg()
    model = build_model(cfg).to(torch.bfloat16)
    inputs = random_inputs(cfg)
    assert model(inputs).dtype == torch.bfloat16
    loss = model(inputs, labels=inputs[:, 1])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("overrides, message", [
    (["model.positions=learned"], "model.arch=t5 'relative' or 'rotary'"),
    (["parallel.pipeline=2"], "the encoder-decoder is not pipelined"),
    (["data.sentinel_tokens=2"], r"makes 2 spans per sample, which need 3 sentinels .* data.sentinel_tokens=2"),
    (["model.seq_len=2048", "data.sentinel_tokens=100", "model.vocab_size=700"],  # the README's example
     r"model.seq_len=2048 makes 102 spans per sample, which need 103 sentinels .* data.sentinel_tokens=100"),
    (["model.seq_len=42", "parallel.tensor=4", "parallel.sequence_parallel=true"],
     r"encoder and decoder lengths \(38, 8\) .* divisible by parallel.tensor=4; e.g. model.seq_len=\d+"),
])
def test_config_refuses_what_t5_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(*overrides)


def test_the_suggested_sequence_length_works_under_sequence_parallelism():
    sequence_parallel = ("parallel.tensor=4", "parallel.sequence_parallel=true")
    with pytest.raises(ConfigError, match=r"e.g. model.seq_len=(\d+)") as refusal:
        tiny_cfg("model.seq_len=42", *sequence_parallel)
    seq_len = refusal.value.args[0].split("model.seq_len=")[-1]
    layout = span_layout(tiny_cfg(f"model.seq_len={seq_len}", *sequence_parallel))
    assert layout.encoder_len % 4 == 0 and layout.decoder_len % 4 == 0
