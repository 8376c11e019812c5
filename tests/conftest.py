"""Shared fixtures. Data: a tiny tokenizer and a tiny preprocessed dataset, built once per session
from the built-in sample corpus (standard-library sources) so every test reuses them cheaply."""
from __future__ import annotations

import os
import sys

import pytest

from megamu.data.preprocess import preprocess
from megamu.data.sources import iter_texts
from megamu.data.tokenizer import Tokenizer, train_tokenizer

# The same place the Makefile builds DeepSpeed's CPU op in (inside the venv), so a bare pytest run
# reuses that build rather than compiling another into a cache shared with other environments.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

TINY_VOCAB = 512
TINY_TOKENIZER_DOCS = "sample:20"
TINY_DATASET_DOCS = "sample:30"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Tokenizer:
    """A 512-piece lossless BPE tokenizer trained on the first 20 sample-corpus files (EOD = eos = 2)."""
    prefix = str(tmp_path_factory.mktemp("tokenizer") / "tiny")
    return Tokenizer(train_tokenizer(iter_texts([TINY_TOKENIZER_DOCS]), prefix, TINY_VOCAB, num_threads=2))


@pytest.fixture(scope="session")
def tiny_dataset_prefix(tmp_path_factory, tiny_tokenizer) -> str:
    """Data prefix (…_text_document) of the first 30 sample-corpus files, tokenized with an EOD after each."""
    out = str(tmp_path_factory.mktemp("dataset") / "tiny")
    summaries = preprocess([TINY_DATASET_DOCS], out, tiny_tokenizer.model_path, append_eod=True, progress=False)
    return summaries["text"].output_prefix


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: with 2+ threads on a busy machine, thread hand-offs cost more than the math."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
