"""Data: tokenizer, sources, .bin/.idx files, GPT sample indices, blending, resumable sampler.

`build_datasets` is the entry point the trainer uses. Importing this package stays light (numpy
only); the torch-facing sampler lives in megamu.data.sampler.
"""
from __future__ import annotations

import os
from typing import Optional, Union

from megamu.config import Config, ConfigError, data_prefixes
from megamu.data.blended import BlendedDataset, build_blended_dataset
from megamu.data.gpt_dataset import SPLIT_NAMES, GPTDataset, split_document_ranges
from megamu.data.index_cache import default_cache_dir
from megamu.data.indexed import IndexedDataset
from megamu.errors import DataError

Dataset = Union[GPTDataset, BlendedDataset]
# Validation and test samples are drawn with this fixed seed, never train.seed: runs that differ only in their
# seed (a ladder's seeds, a sweep's repeats) are then scored on the same text, so their spread is training's.
EVAL_SEED = 0


def build_datasets(cfg: Config, num_samples: dict[str, int]) -> dict[str, Dataset]:
    """Datasets for each of 'train', 'valid', 'test' asked for with num_samples > 0.

    One prefix (data.path) gives GPTDatasets; several (data.paths) give a BlendedDataset per
    split, each prefix split by data.split on its own documents. Under torch.distributed this is
    collective: every rank calls it (rank 0 builds missing index caches while the others wait).
    """
    unknown = sorted(set(num_samples) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; use {', '.join(SPLIT_NAMES)}")
    prefixes = data_prefixes(cfg)
    if not prefixes:
        raise ConfigError("no training data: set data.path (one prefix) or data.paths ([w1, prefix1, ...])")
    wanted = {name: n for name, n in num_samples.items() if n > 0}
    indexed = [IndexedDataset(prefix) for prefix in prefixes]
    ranges = [split_document_ranges(cfg.data.split, ds.num_documents) for ds in indexed]

    def gpt_dataset(d: int, split: str, n: int) -> GPTDataset:
        seed = cfg.train.seed if split == "train" else EVAL_SEED
        return GPTDataset(indexed[d], split, ranges[d][split], cfg.model.seq_len, n, seed, cfg.data.cache_dir)

    if cfg.data.paths is None:
        return {split: gpt_dataset(0, split, n) for split, n in wanted.items()}
    weights = [float(w) for w in cfg.data.paths[0::2]]
    blend_cache = cfg.data.cache_dir or default_cache_dir(prefixes[0])
    return {
        split: build_blended_dataset(
            weights, n, lambda d, k, split=split: gpt_dataset(d, split, k), blend_cache,
            {"prefixes": [os.path.abspath(p) for p in prefixes], "split": split})
        for split, n in wanted.items()
    }


def dataset_bytes_per_token(prefix: str) -> Optional[float]:
    """UTF-8 bytes per token of a preprocessed dataset, from the PREFIX.stats.json sidecar; None if absent."""
    # Imported here: preprocess pulls in the tokenizer, which plain dataset users do not need.
    from megamu.data.preprocess import read_stats, stats_path

    stats = read_stats(prefix)
    if stats is None:
        return None
    tokens, num_bytes = stats.get("tokens"), stats.get("bytes")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (tokens, num_bytes)):
        raise DataError(f"{stats_path(prefix)}: expected numbers under 'tokens' and 'bytes', got {tokens!r} and "
                        f"{num_bytes!r}; re-run megamu-preprocess or delete the file")
    return num_bytes / tokens if tokens else None
