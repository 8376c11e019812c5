"""SentencePiece tokenizer: lossless BPE training and a thin wrapper for any SentencePiece model.

Special ids of the models `train_tokenizer` writes (the Llama layout, plus a pad id):

    UNK_ID = 0   <unk>  (never produced: byte fallback covers every character)
    BOS_ID = 1   <s>
    EOS_ID = 2   </s>   also the end-of-document (EOD) id appended between documents
    PAD_ID = 3   <pad>

Lossless by construction: no Unicode normalization ("identity"), no whitespace collapsing, no
dummy prefix space, whitespace-only pieces allowed (code indentation survives as tokens), and
byte fallback for characters outside the learned vocabulary. So decode(encode(text)) == text.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import sentencepiece as spm

from megamu.errors import ConfigError, DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
EOD_ID = EOS_ID

# SentencePiece treats each training "sentence" as one unit; whole documents keep their newlines
# and indentation, but very long ones are cut at line boundaries into pieces of at most this size.
DEFAULT_MAX_SENTENCE_BYTES = 16384


def _training_sentences(documents: Iterable[str], max_sentences: int, max_bytes: int) -> Iterator[str]:
    """Documents as multi-line training sentences (newlines kept), cut at line ends to fit max_bytes."""
    emitted = 0
    for doc in documents:
        chunk: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            n = len(line.encode("utf-8", "replace"))
            if chunk and size + n > max_bytes:
                yield "".join(chunk)
                emitted += 1
                if emitted >= max_sentences:
                    return
                chunk, size = [], 0
            if n > max_bytes:
                continue  # one line longer than a sentence may be: the trainer would drop it anyway
            chunk.append(line)
            size += n
        if chunk:
            yield "".join(chunk)
            emitted += 1
            if emitted >= max_sentences:
                return


def train_tokenizer(documents: Iterable[str], model_prefix: str, vocab_size: int, max_sentences: int = 100_000,
                    max_sentence_bytes: int = DEFAULT_MAX_SENTENCE_BYTES, character_coverage: float = 0.9995,
                    split_digits: bool = True, num_threads: Optional[int] = None) -> str:
    """Train a lossless byte-fallback BPE model from documents; returns the path of MODEL_PREFIX.model.

    `max_sentences` caps the training sentences (documents, or line-aligned pieces of long ones)
    taken in order from `documents`, so training time stays bounded whatever the corpus size.
    """
    directory = os.path.dirname(os.path.abspath(model_prefix))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"output directory {directory} does not exist (model prefix {model_prefix}); "
                                f"create it first")
    if not os.access(directory, os.W_OK):
        raise DataError(f"output directory {directory} is not writable (model prefix {model_prefix}); choose "
                        f"another prefix or fix its permissions")
    if max_sentences <= 0:
        raise ConfigError(f"--max-sentences must be positive, got {max_sentences}")
    sentences = _training_sentences(documents, max_sentences, max_sentence_bytes)
    first = next(sentences, None)
    if first is None:
        raise DataError("no training text: every input document was empty or skipped; check the inputs and "
                        "--json-keys")

    def all_sentences() -> Iterator[str]:
        yield first
        yield from sentences

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=split_digits,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_bytes,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=False,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:
        # Typically "Vocabulary size is smaller than required_chars": say what to change.
        raise DataError(f"SentencePiece training for {model_prefix} failed: {err}. A byte-fallback model needs "
                         f"vocab_size above 260 plus the number of distinct characters kept; raise vocab_size "
                         f"or lower character_coverage") from err
    return f"{model_prefix}.model"


class Tokenizer:
    """Any SentencePiece model (ours, or e.g. a Llama tokenizer.model): encode, decode, special ids."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        self._sp = _load(model_path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def eod_id(self) -> int:
        """The id appended after each document: the end-of-sentence id."""
        if self._sp.eos_id() < 0:
            raise DataError(f"{self.model_path} defines no end-of-sentence id, so it has no end-of-document id; "
                             f"use a model trained with eos_id set")
        return self._sp.eos_id()

    @property
    def pad_id(self) -> Optional[int]:
        """The padding id, or None for models without one (Llama's has none)."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Union[Sequence[int], np.ndarray]) -> str:
        return self._sp.decode(ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    # SentencePieceProcessor is not picklable: worker processes reload the model from its path.
    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])


def _load(model_path: str) -> spm.SentencePieceProcessor:
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"tokenizer model {model_path} not found; train one with "
                                f"megamu-train-tokenizer or pass an existing SentencePiece .model")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(model_path)
    except (OSError, RuntimeError) as err:
        raise DataError(f"tokenizer model {model_path} is not a readable SentencePiece model ({err}); "
                         f"pass the .model file written by megamu-train-tokenizer") from err
    return sp
