"""Blending several datasets by weight into one sample stream.

Position i of the stream goes to the dataset with the largest deficit weight·(i+1) − count
(ties to the lower index), so every prefix of the stream holds each dataset's share as closely
as a greedy choice can: no dataset is ever a whole sample ahead of its share, and with two or
three datasets none is ever a whole sample behind (with more, the lag can slightly exceed one).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from megamu.data.index_cache import cache_key, load_or_build
from megamu.errors import ConfigError

_CACHED_ARRAYS = ("dataset_index", "dataset_sample_index")


def normalise_weights(weights: Sequence[float]) -> list[float]:
    weights = [float(w) for w in weights]
    if not weights or any(not w > 0 for w in weights):
        raise ValueError(f"blending weights must be positive numbers, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def build_blending_indices(weights: Sequence[float], size: int) -> dict[str, np.ndarray]:
    """For each stream position: which dataset (`dataset_index`) and which of its samples (`dataset_sample_index`).

    Each step depends on the counts so far, so this is one O(size · len(weights)) pass over
    plain Python numbers (about 0.9 M positions/s for three datasets on one CPU core); the result is
    cached.
    """
    weights = normalise_weights(weights)
    num_datasets = len(weights)
    if num_datasets > np.iinfo(np.int16).max:
        raise ConfigError(f"data.paths: at most {np.iinfo(np.int16).max} datasets can be blended, got "
                          f"{num_datasets}; merge some prefixes first (megamu-preprocess --merge)")
    counts = [0] * num_datasets
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    datasets = range(num_datasets)
    for i in range(size):
        target_count = i + 1
        best, best_deficit = 0, weights[0] * target_count - counts[0]
        for d in datasets:
            deficit = weights[d] * target_count - counts[d]
            if deficit > best_deficit:
                best, best_deficit = d, deficit
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}


class BlendedDataset:
    """Stream position i is sample `dataset_sample_index[i]` of dataset `dataset_index[i]`."""

    def __init__(self, datasets: Sequence[Any], dataset_index: np.ndarray, dataset_sample_index: np.ndarray) -> None:
        needed = np.bincount(dataset_index, minlength=len(datasets))
        for d, dataset in enumerate(datasets):
            if needed[d] and (dataset is None or len(dataset) < needed[d]):
                have = 0 if dataset is None else len(dataset)
                raise ValueError(f"blended dataset {d} has {have} samples but the blend takes {int(needed[d])}")
        self.datasets = list(datasets)
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index

    def __len__(self) -> int:
        return int(self.dataset_index.size)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a blended dataset of {len(self)} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


def build_blended_dataset(weights: Sequence[float], size: int,
                          make_dataset: Callable[[int, int], Any], cache_dir: str,
                          cache_fields: dict[str, Any]) -> BlendedDataset:
    """Blend `size` samples; `make_dataset(d, n)` builds dataset d with exactly the n samples the blend takes.

    The blend is cached in `cache_dir` under a key of the weights, size and `cache_fields`
    (which should name the datasets, e.g. their prefixes and split). Datasets the blend never
    reaches (possible only for tiny sizes) are not built.
    """
    weights = normalise_weights(weights)
    key_fields = {**cache_fields, "weights": weights, "size": size}
    stem = f"blend_{cache_key(key_fields)}"
    arrays = load_or_build(cache_dir, stem, _CACHED_ARRAYS, lambda: build_blending_indices(weights, size),
                           key_fields)
    per_dataset = np.bincount(arrays["dataset_index"], minlength=len(weights))
    datasets = [make_dataset(d, int(n)) if n else None for d, n in enumerate(per_dataset)]
    return BlendedDataset(datasets, arrays["dataset_index"], arrays["dataset_sample_index"])
