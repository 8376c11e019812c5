"""Span-corruption (T5) samples from megamu's GPT samples: (encoder ids, decoder ids, labels) per sample.

A GPT sample holds seq_len + 1 tokens; the first seq_len are the text. Exactly `noise` of them are hidden in
`spans` spans (config.span_layout: the same counts for every sample, so every batch has one shape). The span
lengths are a uniformly random composition of `noise` into `spans` positive parts, and the kept text between
them a uniformly random composition of the other seq_len - noise tokens, so the text reads

    kept_0 noise_0 kept_1 noise_1 ... kept_{s-1} noise_{s-1}

(every part at least one token). With S_i the i-th sentinel id (the top data.sentinel_tokens ids of
model.vocab_size, in order) the encoder reads kept_0 S_0 kept_1 S_1 ... kept_{s-1} S_{s-1} (encoder_len ids)
and the decoder learns the targets S_0 noise_0 S_1 noise_1 ... S_{s-1} noise_{s-1} S_s: its inputs are the
targets but the last, its labels the targets but the first (decoder_len ids each). Each row is padded to
seq_len, ids with 0 and labels with IGNORE_INDEX; the model reads the first encoder_len / decoder_len.
`SpanCorruption.reconstruct` inverts a sample, and so is the written definition of the format.

Deterministic per sample like masking.py: sample i of a split draws from a generator seeded with (seed, i).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megamu.config import Config, ConfigError, SpanLayout, span_layout, text_vocab_size
from megamu.data.masking import IGNORE_INDEX


@dataclass(frozen=True)
class SpanCorruption:
    layout: SpanLayout
    seq_len: int
    first_sentinel: int  # S_0's id; S_i is first_sentinel + i, and no text id may reach first_sentinel

    @classmethod
    def from_config(cls, cfg: Config) -> "SpanCorruption":
        return cls(span_layout(cfg), cfg.model.seq_len, text_vocab_size(cfg))

    def sample(self, tokens: np.ndarray, seed: int, index: int) -> np.ndarray:
        """[3, seq_len] int64 (encoder ids, decoder ids, labels) of GPT sample `index` (`tokens`: its
        seq_len + 1 ids)."""
        text = np.asarray(tokens[:self.seq_len], dtype=np.int64)
        self._check_text(text)
        rng = np.random.default_rng([seed, index])
        noise, spans = self.layout.noise, self.layout.spans
        noise_lengths = _random_composition(noise, spans, rng)
        kept_lengths = _random_composition(self.seq_len - noise, spans, rng)
        # Interleaved lengths kept_0, noise_0, kept_1, ...: a mask of the hidden positions.
        hidden = np.repeat(np.tile([False, True], spans), np.stack([kept_lengths, noise_lengths], axis=1).ravel())
        sentinels = self.first_sentinel + np.arange(spans + 1)
        # np.insert puts sentinel i before the element at offset i: after kept_i, before noise_i.
        encoder = np.insert(text[~hidden], np.cumsum(kept_lengths), sentinels[:-1])
        targets = np.append(np.insert(text[hidden], np.cumsum(noise_lengths) - noise_lengths, sentinels[:-1]),
                            sentinels[-1])
        out = np.zeros((3, self.seq_len), dtype=np.int64)
        out[2] = IGNORE_INDEX
        out[0, :len(encoder)] = encoder
        out[1, :len(targets) - 1] = targets[:-1]
        out[2, :len(targets) - 1] = targets[1:]
        return out

    def reconstruct(self, sample: np.ndarray) -> np.ndarray:
        """The seq_len text ids a [3, seq_len] sample was made from: each sentinel of the encoder ids replaced
        by the span that follows the same sentinel in the targets."""
        encoder = sample[0, :self.layout.encoder_len]
        targets = np.append(sample[1, :self.layout.decoder_len], sample[2, self.layout.decoder_len - 1])
        # kept_i S_i pieces (and an empty one after the last sentinel); S_i noise_i pieces (an empty one
        # before S_0, S_s alone at the end).
        kept = np.split(encoder, np.flatnonzero(encoder >= self.first_sentinel) + 1)[:-1]
        hidden = np.split(targets, np.flatnonzero(targets >= self.first_sentinel))[1:-1]
        return np.concatenate([part for k, h in zip(kept, hidden) for part in (k[:-1], h[1:])])

    def _check_text(self, text: np.ndarray) -> None:
        """A text id among the sentinels would make a sample that reads two ways: refuse it, naming the fix."""
        if text.max() >= self.first_sentinel:
            raise ConfigError(
                f"token id {int(text.max())} is at or above the first sentinel id {self.first_sentinel} "
                f"(model.vocab_size - data.sentinel_tokens), so model.arch=t5 cannot tell it from a sentinel; set "
                f"data.tokenizer_model to the tokenizer the data was made with and unset model.vocab_size (megamu "
                f"puts the sentinels above its pieces), or raise model.vocab_size or lower data.sentinel_tokens")


def _random_composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive ints summing to `total`, uniform over all such splits: parts - 1 distinct cuts
    among the total - 1 gaps between consecutive units."""
    cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [total]]))
