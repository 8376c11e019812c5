"""Tokenizer: lossless round trips on code and odd text, documented special ids, multi-line training
sentences, and clear errors for unreadable models."""
from __future__ import annotations

import pickle
import subprocess

import pytest

from megamu.data.sources import iter_texts
from megamu.errors import DataError
from megamu.data.tokenizer import (BOS_ID, EOD_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, _training_sentences,
                                   train_tokenizer)
from conftest import TINY_DATASET_DOCS, TINY_VOCAB
from scripts import script

TRICKY = [
    "  leading spaces\n\ttab-indented\n",
    "\n\nblank lines first and trailing spaces   ",
    "windows\r\nline ends\r\n",
    "unicode: é ß 漢字 🙂 \u00a0nbsp \u200bzero-width",
    "    def f(x):\n        return {'k': [1, 2, 3]}  # comment\n",
    " ",
]


def test_round_trip_is_lossless(tiny_tokenizer):
    docs = list(iter_texts([TINY_DATASET_DOCS])) + TRICKY
    assert len(docs) > 30
    for doc in docs:
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(doc)) == doc


def test_special_ids_are_the_documented_ones(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (UNK_ID, BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2, 3) and EOD_ID == EOS_ID
    assert (tok.bos_id, tok.eos_id, tok.eod_id, tok.pad_id) == (BOS_ID, EOS_ID, EOD_ID, PAD_ID)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok.vocab_size == TINY_VOCAB
    assert UNK_ID not in tok.encode("\u2603 snowman and \U0001f9ea test tube")  # byte fallback, never <unk>


def test_whitespace_and_newlines_are_learned_as_pieces(tiny_tokenizer):
    """Training saw whole multi-line documents: pieces span newlines and indentation runs."""
    pieces = [tiny_tokenizer.id_to_piece(i) for i in range(tiny_tokenizer.vocab_size)]
    assert any("\n" in p and p != "\n" for p in pieces)
    assert "▁▁▁▁" in pieces
    assert len(tiny_tokenizer.encode(" " * 8)) <= 2  # indentation costs a token or two, not eight


def test_training_sentences_keep_lines_and_respect_caps():
    doc = "".join(f"line {i}\n" for i in range(100))
    pieces = list(_training_sentences([doc, "short\n"], max_sentences=1000, max_bytes=64))
    assert all(len(p.encode()) <= 64 for p in pieces)
    assert "".join(pieces) == doc + "short\n"  # cut only at line ends, nothing lost
    assert all(p.endswith("\n") for p in pieces)
    assert len(list(_training_sentences([doc] * 10, max_sentences=3, max_bytes=1 << 20))) == 3


def test_encode_batch_matches_encode(tiny_tokenizer):
    assert tiny_tokenizer.encode_batch(TRICKY) == [tiny_tokenizer.encode(t) for t in TRICKY]


def test_pickles_by_path(tiny_tokenizer):
    clone = pickle.loads(pickle.dumps(tiny_tokenizer))
    assert clone.encode(TRICKY[0]) == tiny_tokenizer.encode(TRICKY[0])


def test_missing_model_names_path(tmp_path):
    path = str(tmp_path / "absent.model")
    with pytest.raises(FileNotFoundError, match="absent.model not found"):
        Tokenizer(path)


def test_corrupt_model_names_path(tmp_path):
    path = tmp_path / "garbage.model"
    path.write_bytes(b"not a sentencepiece model")
    with pytest.raises(DataError, match="garbage.model is not a readable SentencePiece model"):
        Tokenizer(str(path))


def test_too_small_vocab_says_what_to_change(tmp_path):
    with pytest.raises(DataError, match="raise vocab_size"):
        train_tokenizer(["abc\n" * 10, "é漢字🙂\n"], str(tmp_path / "t"), vocab_size=100)


def test_no_training_text(tmp_path):
    with pytest.raises(DataError, match="no training text"):
        train_tokenizer([], str(tmp_path / "t"), vocab_size=300)


def test_command_line_tool(tmp_path):
    out = subprocess.run([script("megamu-train-tokenizer"), "--input", "sample:3", "--vocab-size", "400", "--model-prefix",
                          str(tmp_path / "cli")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "eos/eod 2" in out.stdout and "documents read 3" in out.stdout
    assert Tokenizer(str(tmp_path / "cli.model")).vocab_size == 400
