"""Data made with another tokenizer, or holding token ids the model's vocabulary lacks, is refused before
training with one `error:` line naming the data and the fix (not an IndexError in the embedding at step 1),
whether the ids come from the preprocess sidecar or from a scan of data without one."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import TINY_TOKENIZER_DOCS
from megamu.data.indexed import IndexedDataset
from megamu.data.preprocess import read_stats
from megamu.data.sources import iter_texts
from megamu.data.tokenizer import train_tokenizer
from megamu.data.vocabulary import check_token_ids
from megamu.errors import DataError
from scripts import script
from test_smoke_run import SMALL


def _train(tmp_path, prefix: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([script("megamu-train"), "--config", "tiny", *SMALL, f"data.path={prefix}",
                           f"train.out_dir={tmp_path / 'run'}", "train.max_steps=1", *overrides],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def _without_sidecar(tmp_path, prefix: str) -> str:
    copy = str(tmp_path / "copy" / "data_text_document")
    os.makedirs(os.path.dirname(copy))
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, copy + ext)
    return copy


def _assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_the_sidecar_records_the_tokenizer_digest_and_the_largest_id(tiny_dataset_prefix):
    stats = read_stats(tiny_dataset_prefix)
    dataset = IndexedDataset(tiny_dataset_prefix)
    assert stats["max_token_id"] == dataset.max_token_id() == int(dataset._tokens.max())
    assert len(stats["tokenizer_sha256"]) == 64


def test_data_made_by_another_tokenizer_is_refused(tmp_path, tiny_tokenizer, tiny_dataset_prefix):
    other = train_tokenizer(iter_texts([TINY_TOKENIZER_DOCS]), str(tmp_path / "other"), 384, num_threads=2)
    result = _train(tmp_path, tiny_dataset_prefix, f"data.tokenizer_model={other}")
    _assert_one_error_line(result, tiny_dataset_prefix, "data.tokenizer_model", other, "megamu-preprocess")


@pytest.mark.parametrize("sidecar", [True, False], ids=["from-sidecar", "scanned"])
def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path, tiny_dataset_prefix, sidecar):
    prefix = tiny_dataset_prefix if sidecar else _without_sidecar(tmp_path, tiny_dataset_prefix)
    largest = IndexedDataset(prefix).max_token_id()
    result = _train(tmp_path, prefix, "data.tokenizer_model=null", f"model.vocab_size={largest}")
    _assert_one_error_line(result, prefix, f"token id {largest}", f"model.vocab_size is {largest}")


def test_a_vocabulary_that_holds_every_id_passes(tmp_path, tiny_tokenizer, tiny_dataset_prefix):
    prefix = _without_sidecar(tmp_path, tiny_dataset_prefix)
    largest = IndexedDataset(prefix).max_token_id()
    check_token_ids([prefix], largest + 1, None)
    check_token_ids([tiny_dataset_prefix], tiny_tokenizer.vocab_size, tiny_tokenizer.model_path)
    with pytest.raises(DataError):
        check_token_ids([prefix], largest, None)
