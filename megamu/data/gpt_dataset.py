"""Megatron-style GPT dataset: fixed-length samples cut from a shuffled stream of documents.

Three index arrays, built with numpy and cached (see index_cache.py):

- document index: the split's documents, shuffled independently in each epoch, as many epochs
  as it takes to cover the requested samples (expanded to sequence ids, so a document written
  as several sequences stays whole and in order);
- sample index: for each sample boundary, (position in the document index, token offset).
  Sample j is stream tokens [j·seq_len, j·seq_len + seq_len], i.e. seq_len + 1 tokens, so
  consecutive samples share their boundary token (input and shifted target in one array);
- shuffle index: a permutation of the samples.
"""
from __future__ import annotations

import os
from typing import Optional, Protocol

import numpy as np

from megamu.data.index_cache import cache_key, default_cache_dir, load_or_build
from megamu.errors import ConfigError, DataError

SPLIT_NAMES = ("train", "valid", "test")
_CACHED_ARRAYS = ("document_index", "sample_index", "shuffle_index")


class TokenSequences(Protocol):
    """What the GPT dataset needs from megamu.data.indexed.IndexedDataset."""

    prefix: str
    sizes: np.ndarray
    doc_idx: np.ndarray

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray: ...


# ---- splits --------------------------------------------------------------------------------

def parse_split(split: str) -> list[float]:
    """'969,30,1' (or '969/30/1') → normalised train/valid/test weights; missing entries are 0."""
    parts = [p.strip() for p in split.replace("/", ",").split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"data.split={split!r}: expected up to three comma-separated numbers for "
                          f"train,valid,test (e.g. '969,30,1')") from None
    if len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"data.split={split!r}: give up to three non-negative weights for train,valid,test "
                          f"with a positive sum (e.g. '969,30,1')")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_document_ranges(split: str, num_documents: int) -> dict[str, tuple[int, int]]:
    """Contiguous [start, end) document ranges per split, Megatron's rounding (the last split absorbs drift)."""
    bounds = [0]
    for weight in parse_split(split):
        bounds.append(bounds[-1] + int(round(weight * num_documents)))
    drift = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - drift for b in bounds[1:]]
    return {name: (bounds[i], bounds[i + 1]) for i, name in enumerate(SPLIT_NAMES)}


# ---- index building (pure numpy, no I/O) -----------------------------------------------------

def num_epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Fewest epochs whose token stream holds num_samples samples of seq_len + 1 (boundaries shared)."""
    needed_tokens = num_samples * seq_len + 1
    return -(-needed_tokens // tokens_per_epoch)


def shuffled_document_order(start: int, end: int, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    """Documents start..end-1, independently permuted in each epoch, epochs concatenated."""
    epochs = np.tile(np.arange(start, end, dtype=np.int64), (num_epochs, 1))
    return rng.permuted(epochs, axis=1).reshape(-1)


def documents_to_sequences(documents: np.ndarray, doc_idx: np.ndarray) -> np.ndarray:
    """Sequence ids of each document in `documents`, in order (document k = doc_idx[k]:doc_idx[k+1])."""
    first = doc_idx[documents].astype(np.int64)
    counts = (doc_idx[documents + 1] - doc_idx[documents]).astype(np.int64)
    ends = np.cumsum(counts)
    # Position p inside document slot s maps to first[s] + (p - start of slot s).
    return np.repeat(first - (ends - counts), counts) + np.arange(int(ends[-1]) if ends.size else 0)


def build_sample_index(stream_sizes: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """[num_samples + 1, 2] (position in stream, token offset) of every sample boundary j·seq_len."""
    starts = np.zeros(stream_sizes.size + 1, dtype=np.int64)
    np.cumsum(stream_sizes, dtype=np.int64, out=starts[1:])
    if starts[-1] < num_samples * seq_len + 1:
        raise ValueError(f"stream of {int(starts[-1])} tokens is too short for {num_samples} samples of "
                         f"{seq_len} + 1 tokens")
    boundaries = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    # side="right" skips empty documents: the boundary lands in the one that holds the token.
    position = np.searchsorted(starts, boundaries, side="right") - 1
    return np.stack([position, boundaries - starts[position]], axis=1)


def build_gpt_indices(sizes: np.ndarray, doc_idx: np.ndarray, document_range: tuple[int, int], seq_len: int,
                      num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """The three index arrays for `num_samples` samples from documents in `document_range`."""
    start, end = document_range
    split_sequences = slice(int(doc_idx[start]), int(doc_idx[end]))
    tokens_per_epoch = int(sizes[split_sequences].sum(dtype=np.int64))
    if tokens_per_epoch == 0:
        raise DataError(f"documents {start}..{end - 1} hold no tokens; change data.split or the data")
    rng = np.random.default_rng(seed)
    epochs = num_epochs_needed(tokens_per_epoch, seq_len, num_samples)
    documents = shuffled_document_order(start, end, epochs, rng)
    document_index = documents_to_sequences(documents, np.asarray(doc_idx, dtype=np.int64))
    sample_index = build_sample_index(sizes[document_index], seq_len, num_samples)
    shuffle_index = rng.permutation(num_samples).astype(np.int64)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


# ---- dataset ---------------------------------------------------------------------------------

class GPTDataset:
    """`num_samples` samples of `seq_len + 1` tokens from one split of an indexed dataset.

    `ds[i]` is {"tokens": int64 array of seq_len + 1}. Indices are cached in `cache_dir`
    (default: `index-cache/` beside the data) and memory-mapped.
    """

    def __init__(self, indexed: TokenSequences, split_name: str, document_range: tuple[int, int], seq_len: int,
                 num_samples: int, seed: int, cache_dir: Optional[str] = None) -> None:
        if seq_len <= 0 or num_samples <= 0:
            raise ValueError(f"seq_len ({seq_len}) and num_samples ({num_samples}) must be positive")
        start, end = document_range
        num_documents = int(indexed.doc_idx.size) - 1
        if not 0 <= start <= end <= num_documents:
            raise ValueError(f"document range {document_range} outside the {num_documents} documents of "
                             f"{indexed.prefix}")
        if end == start:
            raise ConfigError(f"data.split gives the '{split_name}' split no documents of {indexed.prefix} "
                              f"({num_documents} documents in all), but {num_samples} {split_name} samples are "
                              f"needed; give '{split_name}' a larger weight in data.split or use more data")
        if int(indexed.sizes[int(indexed.doc_idx[start]):int(indexed.doc_idx[end])].sum(dtype=np.int64)) == 0:
            raise ConfigError(f"data.split: the '{split_name}' split of {indexed.prefix} (documents "
                              f"{start}..{end - 1}) holds no tokens; change data.split or the data")
        self.indexed = indexed
        self.split_name = split_name
        self.seq_len = seq_len
        key_fields = {
            "prefix": os.path.abspath(indexed.prefix),
            "data": [int(indexed.sizes.size), num_documents, int(indexed.sizes.sum(dtype=np.int64))],
            "split": split_name, "document_range": [start, end],
            "seq_len": seq_len, "num_samples": num_samples, "seed": seed,
        }
        stem = f"{os.path.basename(indexed.prefix)}_{split_name}_{cache_key(key_fields)}"
        arrays = load_or_build(
            cache_dir or default_cache_dir(indexed.prefix), stem, _CACHED_ARRAYS,
            lambda: build_gpt_indices(indexed.sizes, indexed.doc_idx, (start, end), seq_len, num_samples, seed),
            key_fields)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return int(self.shuffle_index.size)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for the {self.split_name} dataset ({len(self)} samples)")
        j = int(self.shuffle_index[i])
        (first_pos, first_offset), (last_pos, last_offset) = self.sample_index[j:j + 2].tolist()
        get, sequence = self.indexed.get, self.document_index
        if first_pos == last_pos:
            parts = [get(int(sequence[first_pos]), first_offset, last_offset - first_offset + 1)]
        else:
            parts = [get(int(sequence[first_pos]), first_offset)]
            parts += [get(int(sequence[p])) for p in range(first_pos + 1, last_pos)]
            parts.append(get(int(sequence[last_pos]), 0, last_offset + 1))
        return {"tokens": np.concatenate(parts).astype(np.int64)}
