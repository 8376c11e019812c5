"""Masked-language-model (BERT) samples from megamu's GPT samples: (input ids, labels) per sample.

A GPT sample holds seq_len + 1 tokens; the first seq_len are the text. Of them exactly
round(data.mlm_probability · seq_len) positions (at least one) are predicted: their label is the original
token, every other label is IGNORE_INDEX. Of the predicted positions, round(mlm_mask_fraction · k) take the
mask id, round(mlm_random_fraction · k) a uniformly random token of the vocabulary, and the rest keep their
token (BERT's 80/10/10 rule by default). Exact counts rather than per-token coin flips: no sample is left
without a label, and the fractions hold for every sample. With data.mlm_whole_words the predicted positions
are whole words (the tokenizer's pieces joined where a letter or digit meets a letter or digit), as many as
fit in the same count.

The mask id is data.mask_token_id, which config.resolve fills with the tokenizer's <pad> id: megamu's
SentencePiece models reserve id 3 for <pad> and encoding never produces it, so it stands for [MASK] without
a new piece in the tokenizer.

Deterministic per sample: sample i of a split is masked by a generator seeded with (seed, i), where i is
its position in the split's shuffled order, so the masks do not depend on data-parallel size, loader
workers or where a run resumed. A micro batch is [micro, 2, seq_len] (inputs, labels); data/objectives.py
applies the objective for model.arch=bert and splits its batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from megamu.config import Config, ConfigError, fill_mask_token_id
from megamu.data.tokenizer import Tokenizer

IGNORE_INDEX = -100  # labels the loss skips (torch's and megamu.parallel's ignore index; data sits below both)

@dataclass(frozen=True)
class Masking:
    probability: float
    mask_fraction: float
    random_fraction: float
    mask_id: int
    vocab_size: int
    # whole-word masking: [2, vocab] bools, whether each id's piece begins / ends with a letter or digit
    word_edges: Optional[np.ndarray] = None

    @classmethod
    def from_config(cls, cfg: Config) -> "Masking":
        fill_mask_token_id(cfg)  # the tokenizer's <pad> when unset, or a ConfigError saying what to set
        d = cfg.data
        edges = None
        if d.mlm_whole_words:
            if d.tokenizer_model is None:
                raise ConfigError("data.mlm_whole_words=true needs data.tokenizer_model (words are read from its "
                                  "pieces); set it, or set data.mlm_whole_words=false")
            edges = word_edges(Tokenizer(d.tokenizer_model), cfg.model.vocab_size)
        return cls(d.mlm_probability, d.mlm_mask_fraction, d.mlm_random_fraction, d.mask_token_id,
                   cfg.model.vocab_size, edges)

    def sample(self, tokens: np.ndarray, seed: int, index: int) -> np.ndarray:
        """[2, seq_len] int64 (inputs, labels) of GPT sample `index` (`tokens`: its seq_len + 1 ids)."""
        text = np.asarray(tokens[:-1], dtype=np.int64)
        rng = np.random.default_rng([seed, index])
        n = len(text)
        wanted = max(1, round(self.probability * n))
        chosen = (rng.permutation(n)[:wanted] if self.word_edges is None
                  else _whole_words(word_starts(text, self.word_edges), wanted, rng))
        n_mask = round(self.mask_fraction * len(chosen))
        n_random = min(round(self.random_fraction * len(chosen)), len(chosen) - n_mask)
        labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
        labels[chosen] = text[chosen]
        inputs = text.copy()
        inputs[chosen[:n_mask]] = self.mask_id
        inputs[chosen[n_mask:n_mask + n_random]] = rng.integers(0, self.vocab_size, n_random)
        return np.stack([inputs, labels])


def word_edges(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """[2, vocab_size] bools: does token id's piece begin (row 0) / end (row 1) with a letter or digit."""
    pieces = [tokenizer.id_to_piece(i) if i < tokenizer.vocab_size else "" for i in range(vocab_size)]
    return np.array([[p[:1].isalnum() for p in pieces], [p[-1:].isalnum() for p in pieces]])


def word_starts(text: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bools per token: it begins a word, unless a letter or digit ends the token before and begins it
    (SentencePiece marks a space as "▁", so "▁tok" "en" is one word, "▁a" "," two)."""
    continues = edges[0, text[1:]] & edges[1, text[:-1]]
    return np.concatenate([[True], ~continues])


def _whole_words(starts: np.ndarray, wanted: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of whole words in random order, words added while they fit in `wanted` tokens (the first
    word always, so no sample is left without a label)."""
    bounds = np.append(np.flatnonzero(starts), len(starts))
    chosen: list[int] = []
    for word in rng.permutation(len(bounds) - 1):
        size = bounds[word + 1] - bounds[word]
        if chosen and len(chosen) + size > wanted:
            continue
        chosen.extend(range(bounds[word], bounds[word + 1]))
        if len(chosen) >= wanted:
            break
    return np.array(chosen, dtype=np.int64)
