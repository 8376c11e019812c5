"""model.arch=t5's span-corruption samples (megamu/data/span_corruption.py) and the objective dispatch
(megamu/data/objectives.py): exact counts and filler, span statistics, exact reconstruction, determinism per
(seed, index) whatever the reading order, sentinels in order, the config refusals, and t5 micro batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megamu.config import ConfigError, load_config, resolve, span_layout
from megamu.data.masking import IGNORE_INDEX
from megamu.data.objectives import ObjectiveDataset, inputs_and_labels, objective_batch, objective_datasets
from megamu.data.span_corruption import SpanCorruption

VOCAB = 300  # sentinels 200..299 with the default data.sentinel_tokens=100
T5 = ["model.arch=t5", "model.hidden_size=32", "model.n_heads=4", "model.n_layers=2", "model.seq_len=64",
      "mup.base_hidden_size=16"]


def t5_cfg(*overrides: str):
    return load_config(None, T5 + [f"model.vocab_size={VOCAB}", *overrides]).validate(check_files=False)


def corruption(*overrides: str) -> SpanCorruption:
    return SpanCorruption.from_config(t5_cfg(*overrides))


def text_sample(seq_len: int, seed: int, high: int = 200) -> np.ndarray:
    """A GPT sample: seq_len + 1 random text ids below the first sentinel."""
    return np.random.default_rng(seed).integers(0, high, seq_len + 1)


def segment_lengths(sc: SpanCorruption, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept lengths, hidden span lengths) read off a sample's sentinel positions."""
    encoder = sample[0, :sc.layout.encoder_len]
    targets = np.append(sample[1, :sc.layout.decoder_len], sample[2, sc.layout.decoder_len - 1])
    kept = np.diff(np.concatenate([[-1], np.flatnonzero(encoder >= sc.first_sentinel)])) - 1
    hidden = np.diff(np.flatnonzero(targets >= sc.first_sentinel)) - 1
    return kept, hidden


SETTINGS = [  # (seq_len, density, mean span length)
    ("model.seq_len=64", "data.span_noise_density=0.15", "data.span_mean_length=3"),
    ("model.seq_len=100", "data.span_noise_density=0.5", "data.span_mean_length=1"),
    ("model.seq_len=37", "data.span_noise_density=0.3", "data.span_mean_length=4.5"),
    ("model.seq_len=2", "data.span_noise_density=0.5", "data.span_mean_length=3"),
]


# ---- layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", SETTINGS)
def test_counts_lengths_and_filler_are_the_layouts(settings):
    cfg = t5_cfg(*settings)
    sc, n = SpanCorruption.from_config(cfg), cfg.model.seq_len
    layout = span_layout(cfg)
    assert (sc.layout, sc.seq_len, sc.first_sentinel) == (layout, n, VOCAB - 100)
    for index in range(20):
        sample = sc.sample(text_sample(n, index), seed=3, index=index)
        assert sample.shape == (3, n) and sample.dtype == np.int64
        kept, hidden = segment_lengths(sc, sample)
        assert len(kept) == len(hidden) == layout.spans
        assert hidden.sum() == layout.noise and kept.sum() == n - layout.noise
        assert (hidden >= 1).all() and (kept >= 1).all()
        assert layout.encoder_len == n - layout.noise + layout.spans
        assert layout.decoder_len == layout.noise + layout.spans
        assert (sample[0, layout.encoder_len:] == 0).all() and (sample[1, layout.decoder_len:] == 0).all()
        assert (sample[2, layout.decoder_len:] == IGNORE_INDEX).all()
        assert (sample[2, :layout.decoder_len] != IGNORE_INDEX).all()


def test_span_statistics_over_many_samples():
    sc = corruption("model.seq_len=512")  # density 0.15, mean 3: 77 hidden tokens in 26 spans
    assert (sc.layout.noise, sc.layout.spans) == (77, 26)
    samples = [sc.sample(text_sample(512, i), seed=0, index=i) for i in range(300)]
    lengths = [segment_lengths(sc, s) for s in samples]
    hidden = np.stack([h for _, h in lengths])
    kept = np.stack([k for k, _ in lengths])
    assert (hidden.sum(axis=1) == 77).all()  # the noise fraction is exactly noise / seq_len in every sample
    assert hidden.mean() == pytest.approx(3.0, abs=0.05)  # 77 / 26
    assert hidden.min() >= 1 and kept.min() >= 1
    # A uniformly random composition: every span (first, middle, last) has the mean length on average, and
    # lengths vary rather than being spread evenly.
    assert np.allclose(hidden.mean(axis=0)[[0, 13, 25]], 77 / 26, atol=0.5)
    assert np.allclose(kept.mean(axis=0)[[0, 13, 25]], 435 / 26, atol=4)
    assert hidden.max() >= 8 and len(np.unique(hidden)) >= 6


# ---- format ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", SETTINGS)
def test_inputs_and_targets_reconstruct_the_text_exactly(settings):
    sc = corruption(*settings)
    for seed in range(3):
        for index in range(0, 300, 23):
            tokens = text_sample(sc.seq_len, 1000 * seed + index)
            assert np.array_equal(sc.reconstruct(sc.sample(tokens, seed, index)), tokens[:-1])


def test_labels_are_the_decoder_inputs_shifted_and_sentinels_come_in_order():
    sc = corruption("model.seq_len=128")
    layout, first = sc.layout, sc.first_sentinel
    for index in range(10):
        sample = sc.sample(text_sample(128, index), seed=1, index=index)
        encoder, decoder, labels = sample[0, :layout.encoder_len], sample[1, :layout.decoder_len], \
            sample[2, :layout.decoder_len]
        assert np.array_equal(labels[:-1], decoder[1:])
        assert decoder[0] == first and labels[-1] == first + layout.spans  # S_0 opens, S_s closes the targets
        assert encoder[-1] == first + layout.spans - 1  # the text ends with a hidden span
        assert np.array_equal(encoder[encoder >= first], first + np.arange(layout.spans))
        targets = np.append(decoder, labels[-1])
        assert np.array_equal(targets[targets >= first], first + np.arange(layout.spans + 1))


def test_samples_are_deterministic_per_seed_and_index_whatever_the_order():
    sc = corruption()
    tokens = text_sample(64, 0)
    first = sc.sample(tokens, seed=1, index=5)
    assert np.array_equal(first, sc.sample(tokens, seed=1, index=5))
    assert not np.array_equal(first, sc.sample(tokens, seed=1, index=6))
    assert not np.array_equal(first, sc.sample(tokens, seed=2, index=5))
    gpt = [{"tokens": text_sample(64, i)} for i in range(6)]
    dataset = ObjectiveDataset(gpt, sc, seed=4)
    in_order = [dataset[i]["tokens"] for i in range(6)]
    shuffled = {i: dataset[i]["tokens"] for i in (5, 2, 0, 3, 1, 4)}
    assert all(np.array_equal(in_order[i], shuffled[i]) for i in range(6))
    # Two data-parallel ranks' halves of a batch are the one process's batch.
    cfg, rows = t5_cfg(), torch.from_numpy(np.stack([g["tokens"] for g in gpt]))
    whole = objective_batch(cfg, rows, seed=4)
    halves = torch.cat([objective_batch(cfg, rows[:3], seed=4), objective_batch(cfg, rows[3:], 4, first_index=3)])
    assert torch.equal(whole, halves) and torch.equal(whole[2], torch.from_numpy(in_order[2]))


def test_a_text_id_among_the_sentinels_is_refused():
    sc = corruption()
    tokens = text_sample(64, 0)
    tokens[10] = 200
    with pytest.raises(ConfigError, match="token id 200 is at or above the first sentinel id 200.*model.vocab_size"):
        sc.sample(tokens, seed=0, index=0)
    tokens[10] = 199
    tokens[64] = 250  # the GPT sample's extra last token is not text
    sc.sample(tokens, seed=0, index=0)


# ---- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["model.seq_len=200", "data.sentinel_tokens=5"], "10 spans .*need 11 sentinels.*data.sentinel_tokens=5"),
    (["data.span_noise_density=0"], r"data.span_noise_density=0.0 must lie in \(0, 1\)"),
    (["data.span_noise_density=1"], r"data.span_noise_density=1.0 must lie in \(0, 1\)"),
    (["parallel.pipeline=2"], "model.arch=t5 with parallel.pipeline=2"),
])
def test_config_refuses_what_span_corruption_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        t5_cfg(*overrides)


def test_sentinels_sit_above_the_tokenizers_pieces(tiny_tokenizer):
    base = T5 + [f"data.tokenizer_model={tiny_tokenizer.model_path}"]
    too_small = load_config(None, base + [f"model.vocab_size={tiny_tokenizer.vocab_size}"])
    with pytest.raises(ConfigError, match="model.vocab_size=512 leaves no room for the data.sentinel_tokens=100"):
        resolve(too_small, check_files=False)
    filled = load_config(None, base)
    resolve(filled, check_files=False)
    assert filled.model.vocab_size == tiny_tokenizer.vocab_size + 100
    assert SpanCorruption.from_config(filled).first_sentinel == tiny_tokenizer.vocab_size


# ---- micro batches --------------------------------------------------------------------------------

def test_t5_micro_batches_split_into_encoder_decoder_inputs_and_labels():
    cfg = t5_cfg("train.seed=9")
    gpt = [{"tokens": text_sample(64, i)} for i in range(4)]
    datasets = objective_datasets(cfg, {"train": gpt, "valid": gpt})
    assert isinstance(datasets["train"], ObjectiveDataset) and datasets["train"].seed == 9
    assert not np.array_equal(datasets["train"][1]["tokens"], datasets["valid"][1]["tokens"])  # EVAL_SEED
    batch = objective_batch(cfg, torch.from_numpy(np.stack([g["tokens"] for g in gpt])), seed=9)
    assert batch.shape == (4, 3, 64) and batch.dtype == torch.int64
    assert torch.equal(batch[1], torch.from_numpy(datasets["train"][1]["tokens"]))
    inputs, labels = inputs_and_labels(batch)
    assert inputs.shape == (4, 2, 64) and labels.shape == (4, 64)
    assert torch.equal(inputs, batch[:, :2]) and torch.equal(labels, batch[:, 2])
