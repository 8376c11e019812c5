"""model.arch=bert: config keys and refusals, the bidirectional encoder with its masked-LM head and μP roles,
masked-LM samples (counts, labels, whole words, determinism per seed and sample), a run through the trainer
(the loss falls; PP=2, stopped and resumed, gives the single process's losses). Its ladder is in test_ladder.py,
μP = SP at the base width and TP=2 = TP=1 are in test_mup.py and test_tp_model.py, the coordinate check in
test_coord_check.py, parametrized over bert."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megamu.cli import generate as generate_tool
from megamu.config import ConfigError, fill_mask_token_id, fill_vocab_size, load_config
from megamu.data.masking import IGNORE_INDEX, Masking, word_starts
from megamu.data.objectives import inputs_and_labels, objective_datasets
from megamu.data.sources import iter_texts
from megamu.model import build_model, mup, param_counts
from test_train_e2e import MAX_STEPS, losses, same_losses, stopped_and_resumed, train_ok, write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 100
BERT = ["model.arch=bert", "data.mask_token_id=3"]


def tiny_cfg(*overrides: str):
    base = [f"model.vocab_size={VOCAB}", "model.hidden_size=32", "model.n_heads=4", "model.n_layers=2",
            "model.seq_len=40", "mup.base_hidden_size=16"]
    return load_config(None, base + list(overrides))


# ---- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["model.arch=gpt3"], "model.arch must be one of llama, gpt2, bert, t5, got 'gpt3'"),
    (["model.arch=gpt2", "model.positions=rotary"], "model.arch=bert chooses 'learned' or 'rotary'"),
    (["model.arch=bert", "model.positions=relative"], "model.positions='relative'"),
    (["model.arch=bert", "model.positions=alibi"], "model.positions='alibi'"),
    (["model.arch=bert", "data.mlm_probability=0"], r"data.mlm_probability=0.0 must lie in \(0, 1\]"),
    (["model.arch=bert", "data.mlm_mask_fraction=0.95"], "sum of at most 1"),
    (["model.arch=bert", "data.mask_token_id=100"], "data.mask_token_id=100 is not a token id"),
])
def test_config_refuses_what_bert_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(*overrides).validate(check_files=False)


def test_mask_id_comes_from_the_tokenizers_pad_or_is_asked_for(tiny_tokenizer):
    cfg = tiny_cfg("model.arch=bert", f"data.tokenizer_model={tiny_tokenizer.model_path}")
    fill_mask_token_id(cfg)
    assert cfg.data.mask_token_id == tiny_tokenizer.pad_id == 3
    # The coordinate check and the datasets build their masking from a config the trainer did not resolve.
    masking = Masking.from_config(tiny_cfg("model.arch=bert", f"data.tokenizer_model={tiny_tokenizer.model_path}"))
    assert masking.mask_id == 3 and masking.vocab_size == VOCAB
    with pytest.raises(ConfigError, match="needs a mask token: data.mask_token_id is unset"):
        fill_mask_token_id(tiny_cfg("model.arch=bert"))


def test_a_tokenizer_without_pad_gets_a_mask_id_appended_above_its_pieces(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    prefix = str(tmp_path / "no_pad")
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(list(iter_texts(["sample:5"]))),
                                             model_prefix=prefix, vocab_size=600, model_type="bpe", pad_id=-1,
                                             byte_fallback=True, minloglevel=2)
    pieces = 600
    cfg = load_config(None, ["model.arch=bert", f"data.tokenizer_model={prefix}.model"])
    fill_vocab_size(cfg)
    fill_mask_token_id(cfg)
    assert (cfg.model.vocab_size, cfg.data.mask_token_id) == (pieces + 1, pieces)  # an id no text holds
    decoder = load_config(None, [f"data.tokenizer_model={prefix}.model"])
    fill_vocab_size(decoder)
    assert decoder.model.vocab_size == pieces  # only bert appends it
    with pytest.raises(ConfigError, match=f"model.vocab_size \\({pieces}\\) leaves no id above its pieces"):
        fill_mask_token_id(load_config(None, ["model.arch=bert", f"data.tokenizer_model={prefix}.model",
                                              f"model.vocab_size={pieces}"]))


# ---- model ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_encoder_is_bidirectional_and_sized_as_counted(positions):
    cfg = tiny_cfg(*BERT, f"model.positions={positions}", "mup.zero_readout=false")
    model = build_model(cfg)
    assert (model.layers[0].positions is None) == (positions == "rotary")
    assert all((block.attn.rope is not None) == (positions == "rotary") for block in model.layers[1:-2])
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    # The last token reaches the first position's logits: nothing is causal.
    assert not torch.allclose(model(tokens)[:, 0], model(changed)[:, 0])
    assert param_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_masked_lm_transform_is_a_hidden_matrix_and_the_decoder_the_readout():
    cfg = tiny_cfg(*BERT)
    model = build_model(cfg)
    roles = mup.parameters_by_role(model)
    head = f"layers.{cfg.model.n_layers + 1}"
    assert f"{head}.dense.weight" in roles["hidden_in"]
    assert {f"{head}.final_norm.weight", f"{head}.norm.weight"} <= set(roles["norm"])
    assert roles["readout"] == [f"layers.{cfg.model.n_layers + 2}.weight"]
    assert roles["position"] == ["layers.0.positions.weight"]
    hidden = next(g for g in mup.param_groups(model, cfg) if g["name"] == "hidden")
    assert any(p is model.layers[-2].dense.weight for p in hidden["params"])
    assert hidden["lr_mult"] == pytest.approx(1 / cfg.width_mult)  # η/m like the blocks' matrices


# ---- masked-LM samples ----------------------------------------------------------------------------

def test_masking_counts_labels_and_replacements():
    masking = Masking(probability=0.15, mask_fraction=0.8, random_fraction=0.1, mask_id=3, vocab_size=VOCAB)
    tokens = 10 + np.arange(201) % 80  # 201 ids, none of them the mask id
    inputs, labels = masking.sample(tokens, seed=7, index=0)
    text = tokens[:-1]
    predicted = labels != IGNORE_INDEX
    assert predicted.sum() == 30  # round(0.15 · 200)
    assert np.array_equal(labels[predicted], text[predicted])
    assert np.array_equal(inputs[~predicted], text[~predicted])  # only predicted positions change
    assert (inputs[predicted] == 3).sum() == 24  # 80 % masked
    assert (inputs[predicted] == text[predicted]).sum() >= 3  # 10 % kept (a random draw may equal its token)
    assert ((inputs[predicted] != 3) & (inputs[predicted] != text[predicted])).sum() <= 3


def test_masking_is_deterministic_per_seed_and_sample():
    masking = Masking(0.15, 0.8, 0.1, mask_id=3, vocab_size=VOCAB)
    tokens = np.arange(41) + 10
    first = masking.sample(tokens, seed=1, index=5)
    assert np.array_equal(first, masking.sample(tokens, seed=1, index=5))
    assert not np.array_equal(first, masking.sample(tokens, seed=1, index=6))
    assert not np.array_equal(first, masking.sample(tokens, seed=2, index=5))


def test_whole_word_masking_predicts_whole_words(tiny_tokenizer):
    cfg = tiny_cfg(*BERT, "data.mlm_whole_words=true", f"data.tokenizer_model={tiny_tokenizer.model_path}",
                   f"model.vocab_size={tiny_tokenizer.vocab_size}", "data.mlm_probability=0.3")
    masking = Masking.from_config(cfg)
    tokens = np.array(tiny_tokenizer.encode("Tokenisers split unfamiliar words, like antidisestablishment, "
                                            "into pieces; masking takes whole ones.") + [2])
    pieces = [tiny_tokenizer.id_to_piece(t) for t in tokens[:-1]]
    starts = word_starts(tokens[:-1], masking.word_edges)
    assert all(start == (not p[0].isalnum() or not prev[-1].isalnum())
               for p, prev, start in zip(pieces[1:], pieces, starts[1:]))
    words = np.cumsum(starts)
    assert words[-1] < len(pieces)  # some word spans several pieces
    longest_word = np.bincount(words).max()
    for seed in range(5):
        labels = masking.sample(tokens, seed, index=0)[1]
        predicted = labels != IGNORE_INDEX
        # Words are added while they fit; the first one always is, however long.
        assert 1 <= predicted.sum() <= max(round(0.3 * len(pieces)), longest_word)
        for word in np.unique(words[predicted]):
            assert predicted[words == word].all()  # a word is predicted whole or not at all
    with pytest.raises(ConfigError, match="data.mlm_whole_words=true needs data.tokenizer_model"):
        Masking.from_config(tiny_cfg(*BERT, "data.mlm_whole_words=true"))


def test_masked_datasets_give_inputs_and_labels_and_decoders_are_unchanged():
    samples = [{"tokens": np.arange(41) + i} for i in range(4)]
    gpt = objective_datasets(tiny_cfg(), {"train": samples})
    assert gpt["train"] is samples
    masked = objective_datasets(tiny_cfg(*BERT, "train.seed=9"), {"train": samples, "valid": samples})
    train_sample = masked["train"][2]["tokens"]
    assert train_sample.shape == (2, 40)
    assert not np.array_equal(train_sample, masked["valid"][2]["tokens"])  # validation masks its own way
    batch = torch.from_numpy(np.stack([masked["train"][i]["tokens"] for i in range(2)]))
    inputs, labels = inputs_and_labels(batch)
    assert torch.equal(labels, batch[:, 1]) and torch.equal(inputs, batch[:, 0])
    tokens = torch.arange(10).view(2, 5)
    assert [t.tolist() for t in inputs_and_labels(tokens)] == [tokens[:, :-1].tolist(), tokens[:, 1:].tolist()]


# ---- trainer --------------------------------------------------------------------------------------

def test_trainer_runs_bert_the_loss_falls_and_pp2_resumed_equals_pp1(tmp_path, tiny_tokenizer, tiny_dataset_prefix,
                                                                     capsys):
    config = write_config(str(tmp_path / "bert.yaml"), tiny_tokenizer.model_path, tiny_dataset_prefix,
                          str(tmp_path / "runs"))
    # The mask id is the tokenizer's <pad>, filled in by resolve; positions rotary, to cover both kinds.
    bert = ["model.arch=bert", "model.positions=rotary", "data.mlm_probability=0.3"]
    whole = losses(train_ok(config, tmp_path / "whole", *bert))
    assert len(whole) == MAX_STEPS and whole[MAX_STEPS] < whole[1]
    # Two pipeline stages, stopped after step 3 and resumed: the single process's losses (a resume that
    # masked other positions, or a stage that saw other masks, would be far off).
    stopped, pp2 = tmp_path / "stopped", ("parallel.pipeline=2", "train.eval_interval=0")
    resumed = stopped_and_resumed(config, stopped, *bert, *pp2, nprocs=2)
    assert same_losses(resumed, whole), (resumed, whole)
    assert generate_tool.main([str(stopped), "--prompt", "the"]) == 2  # a decoder's tool refuses an encoder
    assert "masked-LM encoder" in capsys.readouterr().err
