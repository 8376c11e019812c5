"""Does the data fit the model's vocabulary? Checked before training, because a token id at or beyond
`model.vocab_size` otherwise surfaces as an opaque IndexError in the embedding (a device-side assert on a
GPU) at the first step.

A megamu-preprocess sidecar (`PREFIX.stats.json`) records the tokenizer's vocabulary, its SHA-256 and the
largest token id, so the check reads a few bytes; data without them (other tools, older sidecars) is
scanned once.
"""
from __future__ import annotations

from typing import Optional

from megamu.data.indexed import IndexedDataset
from megamu.data.preprocess import read_stats, stats_path
from megamu.errors import DataError
from megamu.fileio import file_sha256


def check_token_ids(prefixes: list[str], vocab_size: int, tokenizer_model: Optional[str], sentinels: int = 0) -> None:
    """DataError naming the file and the fix when a prefix was made by another tokenizer than
    `tokenizer_model` or holds a token id ≥ `vocab_size` - `sentinels` (t5's sentinels are the top ids)."""
    tokenizer_digest = file_sha256(tokenizer_model) if tokenizer_model else None
    for prefix in prefixes:
        stats = read_stats(prefix) or {}
        recorded = stats.get("tokenizer_sha256")
        if tokenizer_digest and recorded and recorded != tokenizer_digest:
            raise DataError(f"{prefix}: tokenized with {stats.get('tokenizer', 'another tokenizer')} "
                            f"(vocabulary {stats.get('vocab_size', '?')}; {stats_path(prefix)}), not with "
                            f"data.tokenizer_model={tokenizer_model}; set data.tokenizer_model to the tokenizer the "
                            f"data was made with, or re-run megamu-preprocess with this one")
        max_id = stats.get("max_token_id")
        if max_id is None:
            dataset = IndexedDataset(prefix)
            try:
                max_id = dataset.max_token_id()
            finally:
                dataset.close()
        if max_id >= vocab_size - sentinels:
            limit = (f"model.vocab_size is {vocab_size}" if not sentinels else
                     f"text ids must lie below {vocab_size - sentinels} (model.vocab_size={vocab_size} less "
                     f"data.sentinel_tokens={sentinels})")
            raise DataError(f"{prefix}: holds token id {max_id} but {limit}; the data was made with a larger "
                            f"vocabulary: set data.tokenizer_model (or model.vocab_size) to the tokenizer the data "
                            f"was made with, or re-run megamu-preprocess with this one")
