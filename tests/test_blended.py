"""Blending: the greedy largest-deficit rule against a reference, shares within one sample on every
prefix of the stream, blended samples equal their source samples, and the blend cache."""
from __future__ import annotations

import os

import numpy as np
import pytest

import megamu.data.blended as blended
from megamu.config import Config
from megamu.data import build_datasets
from megamu.data.blended import BlendedDataset, build_blending_indices
from megamu.data.indexed import IndexedDatasetWriter


def reference_blend(weights: list[float], size: int) -> list[int]:
    """The rule spelled out: at position i pick argmax of weight·(i+1) − count (first on ties)."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.zeros(len(weights))
    choice = []
    for i in range(size):
        d = int(np.argmax(w * (i + 1) - counts))
        counts[d] += 1
        choice.append(d)
    return choice


@pytest.mark.parametrize("weights", [[1, 1], [0.7, 0.3], [5, 3, 2], [0.01, 0.98, 0.01], [2, 1, 1, 1]])
def test_greedy_rule_matches_reference(weights):
    indices = build_blending_indices(weights, 500)
    assert indices["dataset_index"].tolist() == reference_blend(weights, 500)


def test_every_prefix_within_one_sample_of_its_share():
    rng = np.random.default_rng(0)
    for trial in range(30):
        weights = rng.random(2 + trial % 2) + 0.01  # two and three datasets
        size = 2000
        choice = build_blending_indices(weights.tolist(), size)["dataset_index"]
        counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[choice], axis=0)
        targets = np.arange(1, size + 1)[:, None] * (weights / weights.sum())[None, :]
        assert np.abs(counts - targets).max() < 1.0, weights


def test_dataset_sample_index_counts_each_dataset_in_order():
    indices = build_blending_indices([3, 1, 2], 600)
    for d in range(3):
        taken = indices["dataset_sample_index"][indices["dataset_index"] == d]
        assert taken.tolist() == list(range(taken.size))


def test_blended_dataset_refuses_too_small_sources():
    dataset_index = np.array([0, 1, 0, 1], dtype=np.int16)
    with pytest.raises(ValueError, match="dataset 1 has 1 samples but the blend takes 2"):
        BlendedDataset([[{}, {}], [{}]], dataset_index, np.array([0, 0, 1, 1]))


def write_prefix(path: str, seed: int, n_docs: int) -> str:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(path, np.uint16) as writer:
        for _ in range(n_docs):
            writer.add_document(rng.integers(0, 60000, size=int(rng.integers(1, 30))))
    return path


@pytest.fixture
def blend_config(tmp_path) -> Config:
    cfg = Config()
    cfg.data.paths = [0.6, write_prefix(str(tmp_path / "a_text_document"), 1, 30),
                      0.4, write_prefix(str(tmp_path / "b_text_document"), 2, 50)]
    cfg.data.split = "8,2,0"
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.model.seq_len = 6
    return cfg


def test_build_datasets_blends_whole_source_samples(blend_config):
    datasets = build_datasets(blend_config, {"train": 100, "valid": 20, "test": 0})
    assert set(datasets) == {"train", "valid"}
    for name, size in (("train", 100), ("valid", 20)):
        ds = datasets[name]
        assert len(ds) == size
        per_source = np.bincount(ds.dataset_index, minlength=2)
        assert [len(source) for source in ds.datasets] == per_source.tolist()  # built with exactly what it takes
        assert abs(per_source[0] - 0.6 * size) < 1
        for i in range(size):
            source = ds.datasets[int(ds.dataset_index[i])]
            assert source.split_name == name
            tokens = ds[i]["tokens"]
            assert tokens.shape == (7,)
            assert tokens.tolist() == source[int(ds.dataset_sample_index[i])]["tokens"].tolist()


def test_second_blend_build_hits_cache(blend_config, monkeypatch):
    first = build_datasets(blend_config, {"train": 64})["train"]
    blend_files = {f: os.stat(os.path.join(blend_config.data.cache_dir, f)).st_mtime_ns
                   for f in os.listdir(blend_config.data.cache_dir) if f.startswith("blend_")}
    assert len(blend_files) == 3  # two arrays and the description

    def must_not_build(*args, **kwargs):
        raise AssertionError("blend rebuilt despite a cache hit")

    monkeypatch.setattr(blended, "build_blending_indices", must_not_build)
    second = build_datasets(blend_config, {"train": 64})["train"]
    assert {f: os.stat(os.path.join(blend_config.data.cache_dir, f)).st_mtime_ns for f in blend_files} == blend_files
    assert all(first[i]["tokens"].tolist() == second[i]["tokens"].tolist() for i in range(64))
    blend_config.data.paths[0] = 0.5  # new weights: new key, so a rebuild is required
    with pytest.raises(AssertionError, match="blend rebuilt"):
        build_datasets(blend_config, {"train": 64})
