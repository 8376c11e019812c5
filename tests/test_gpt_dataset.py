"""GPT dataset: sample contents against a pure-Python reference, Megatron boundary semantics, per-epoch
coverage, document splits, the index cache, and build_datasets."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import megamu.data.gpt_dataset as gpt_dataset
from megamu.config import Config, ConfigError
from megamu.data import build_datasets, dataset_bytes_per_token
from megamu.data.gpt_dataset import GPTDataset, parse_split, split_document_ranges
from megamu.data.indexed import IndexedDataset, IndexedDatasetWriter
from megamu.errors import DataError


def write_documents(prefix: str, documents: list[list[list[int]]]) -> IndexedDataset:
    """Each document is a list of sequences."""
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for sequences in documents:
            for tokens in sequences:
                writer.add_item(np.asarray(tokens, dtype=np.int64))
            writer.end_document()
    return IndexedDataset(prefix)


def random_documents(seed: int, n: int, max_len: int = 30) -> list[list[list[int]]]:
    """Single-sequence documents of random tokens; lengths include 0 (empty documents must be skipped)."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 60000, size=int(rng.integers(0, max_len))).tolist()] for _ in range(n)]


def reference_samples(documents: list[list[list[int]]], sequence_order: list[int], seq_len: int,
                      num_samples: int) -> list[list[int]]:
    """Samples as plain list slices of the concatenated token stream (boundary token shared)."""
    sequences = [seq for doc in documents for seq in doc]
    stream: list[int] = []
    for s in sequence_order:
        stream.extend(sequences[s])
    return [stream[j * seq_len: j * seq_len + seq_len + 1] for j in range(num_samples)]


def reference_sample_index(sizes: list[int], order: list[int], seq_len: int, num_samples: int) -> list[tuple[int, int]]:
    """Megatron's sequential construction: walk seq_len + 1 tokens, then step back one for the shared token."""
    index = [(0, 0)]
    pos, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_len + 1
        while remaining:
            available = sizes[order[pos]] - offset
            remaining -= available
            if remaining <= 0:
                offset += remaining + available - 1
                remaining = 0
            else:
                pos, offset = pos + 1, 0
        index.append((pos, offset))
    return index


@pytest.fixture
def corpus(tmp_path):
    documents = random_documents(seed=0, n=40)
    return documents, write_documents(str(tmp_path / "corpus_text_document"), documents)


@pytest.mark.parametrize("seq_len,num_samples", [(7, 50), (16, 90), (1, 30)])
def test_samples_equal_reference_stream(corpus, tmp_path, seq_len, num_samples):
    documents, indexed = corpus
    ds = GPTDataset(indexed, "train", (0, 40), seq_len, num_samples, seed=3, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == num_samples
    expected = reference_samples(documents, ds.document_index.tolist(), seq_len, num_samples)
    for i in range(num_samples):
        tokens = ds[i]["tokens"]
        assert tokens.dtype == np.int64 and tokens.shape == (seq_len + 1,)
        assert tokens.tolist() == expected[int(ds.shuffle_index[i])]
    assert sorted(ds.shuffle_index.tolist()) == list(range(num_samples))
    sizes = indexed.sizes.tolist()
    assert ([tuple(r) for r in ds.sample_index.tolist()]
            == reference_sample_index(sizes, ds.document_index.tolist(), seq_len, num_samples))
    with pytest.raises(IndexError):
        ds[num_samples]


def test_every_document_once_per_epoch_and_reshuffled(corpus, tmp_path):
    documents, indexed = corpus
    start, end = 5, 35
    ds = GPTDataset(indexed, "valid", (start, end), 9, 200, seed=1, cache_dir=str(tmp_path))
    order = ds.document_index.tolist()
    n = end - start
    assert len(order) % n == 0 and len(order) // n >= 2  # several epochs were needed
    epochs = [order[k:k + n] for k in range(0, len(order), n)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(start, end))
    assert len({tuple(e) for e in epochs}) > 1
    # The fewest epochs that hold the samples: one epoch less would be too short.
    tokens_per_epoch = sum(len(documents[d][0]) for d in range(start, end))
    assert (len(epochs) - 1) * tokens_per_epoch < 200 * 9 + 1 <= len(epochs) * tokens_per_epoch
    # Samples in stream order, boundary tokens counted once, contain every token of the first epoch in order.
    in_stream_order = sorted(range(200), key=lambda i: int(ds.shuffle_index[i]))
    covered = ds[in_stream_order[0]]["tokens"].tolist()
    for i in in_stream_order[1:]:
        covered += ds[i]["tokens"].tolist()[1:]
    first_epoch = [t for d in epochs[0] for t in documents[d][0]]
    assert covered[:len(first_epoch)] == first_epoch


def test_multi_sequence_documents_stay_whole(tmp_path):
    rng = np.random.default_rng(5)
    documents = [[rng.integers(0, 999, size=int(rng.integers(1, 8))).tolist() for _ in range(int(rng.integers(1, 4)))]
                 for _ in range(12)]
    indexed = write_documents(str(tmp_path / "multi"), documents)
    ds = GPTDataset(indexed, "train", (0, 12), 5, 40, seed=0, cache_dir=str(tmp_path))
    order = ds.document_index.tolist()
    first_sequence = np.cumsum([0] + [len(d) for d in documents]).tolist()
    pos = 0
    while pos < len(order):  # every document appears as its sequences, consecutive and in order
        doc = first_sequence.index(order[pos])
        count = len(documents[doc])
        assert order[pos:pos + count] == list(range(order[pos], order[pos] + count))
        pos += count
    expected = reference_samples(documents, order, 5, 40)
    assert all(ds[i]["tokens"].tolist() == expected[int(ds.shuffle_index[i])] for i in range(40))


def test_split_ranges_follow_megatron_rounding():
    assert split_document_ranges("969,30,1", 1000) == {"train": (0, 969), "valid": (969, 999), "test": (999, 1000)}
    assert split_document_ranges("1,1,1", 10) == {"train": (0, 4), "valid": (4, 7), "test": (7, 10)}
    assert split_document_ranges("98/2", 100) == {"train": (0, 98), "valid": (98, 100), "test": (100, 100)}
    rng = np.random.default_rng(0)
    for _ in range(50):
        weights = rng.integers(0, 100, size=3) + np.array([1, 0, 0])
        n = int(rng.integers(0, 500))
        ranges = split_document_ranges(",".join(map(str, weights)), n)
        bounds = [ranges["train"][0], ranges["train"][1], ranges["valid"][1], ranges["test"][1]]
        assert bounds[0] == 0 and bounds[-1] == n and bounds == sorted(bounds)
        assert ranges["train"][1] == ranges["valid"][0] and ranges["valid"][1] == ranges["test"][0]
        for (lo, hi), w in zip(ranges.values(), parse_split(",".join(map(str, weights)))):
            assert abs((hi - lo) - w * n) <= 1.5


@pytest.mark.parametrize("bad", ["", "a,b", "1,2,3,4", "-1,2", "0,0,0"])
def test_bad_split_string_names_the_key(bad):
    with pytest.raises(ConfigError, match="data.split"):
        parse_split(bad)


def config_for(prefix: str, **data) -> Config:
    cfg = Config()
    cfg.data.path = prefix
    cfg.model.seq_len = 8
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_empty_split_asked_for_samples_names_data_split(corpus):
    _, indexed = corpus
    cfg = config_for(indexed.prefix, split="100,0,0")
    with pytest.raises(ConfigError, match="data.split"):
        build_datasets(cfg, {"train": 10, "valid": 5})
    assert set(build_datasets(cfg, {"train": 10, "valid": 0})) == {"train"}


def test_build_datasets_single_prefix_default_cache_beside_data(corpus, tmp_path):
    _, indexed = corpus
    cfg = config_for(indexed.prefix, split="30,10,0")
    datasets = build_datasets(cfg, {"train": 20, "valid": 6, "test": 0})
    assert set(datasets) == {"train", "valid"}
    assert len(datasets["train"]) == 20 and len(datasets["valid"]) == 6
    assert set(datasets["valid"].document_index.tolist()) == set(range(30, 40))
    assert set(datasets["train"].document_index.tolist()) == set(range(30))
    cache_files = os.listdir(tmp_path / "index-cache")
    assert any(f.startswith("corpus_text_document_train_") and f.endswith("_shuffle_index.npy") for f in cache_files)
    assert not [f for f in cache_files if ".tmp" in f]  # atomic_write's temporaries end in .tmp


def test_train_seed_reshuffles_training_data_but_not_the_validation_set(corpus, tmp_path):
    _, indexed = corpus
    cfg = config_for(indexed.prefix, split="20,20,0", cache_dir=str(tmp_path / "cache"))
    tokens = {}
    for seed in (1, 2):
        cfg.train.seed = seed
        datasets = build_datasets(cfg, {"train": 30, "valid": 30})
        tokens[seed] = {split: [ds[i]["tokens"].tolist() for i in range(len(ds))] for split, ds in datasets.items()}
    assert tokens[1]["train"] != tokens[2]["train"]
    # Runs that differ only in their seed are scored on the same text.
    assert tokens[1]["valid"] == tokens[2]["valid"]


def cache_files(directory) -> dict[str, int]:
    return {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in os.listdir(directory)}


def test_second_build_hits_cache(corpus, tmp_path, monkeypatch):
    _, indexed = corpus
    cache = tmp_path / "cache"
    first = GPTDataset(indexed, "train", (0, 40), 8, 30, seed=7, cache_dir=str(cache))
    before = cache_files(cache)

    def must_not_build(*args, **kwargs):
        raise AssertionError("index rebuilt despite a cache hit")

    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", must_not_build)
    second = GPTDataset(indexed, "train", (0, 40), 8, 30, seed=7, cache_dir=str(cache))
    assert cache_files(cache) == before
    assert isinstance(second.shuffle_index.base, np.memmap)  # loaded by memory map
    assert all(first[i]["tokens"].tolist() == second[i]["tokens"].tolist() for i in range(30))


@pytest.mark.parametrize("change", [{"seed": 8}, {"seq_len": 9}, {"num_samples": 31}, {"split": "valid"}])
def test_changed_inputs_get_a_new_cache_key(corpus, tmp_path, change):
    _, indexed = corpus
    cache = tmp_path / "cache"
    base = {"split": "train", "seq_len": 8, "num_samples": 30, "seed": 7}
    GPTDataset(indexed, base["split"], (0, 40), base["seq_len"], base["num_samples"], base["seed"], str(cache))
    before = cache_files(cache)
    args = {**base, **change}
    GPTDataset(indexed, args["split"], (0, 40), args["seq_len"], args["num_samples"], args["seed"], str(cache))
    after = cache_files(cache)
    new = set(after) - set(before)
    assert len(new) == 4  # three arrays and the description
    assert all(after[f] == before[f] for f in before)
    description = json.loads((cache / next(f for f in new if f.endswith(".json"))).read_text())
    assert description["seed"] == args["seed"] and description["seq_len"] == args["seq_len"]


def test_dataset_bytes_per_token(tmp_path):
    prefix = str(tmp_path / "x_text_document")
    assert dataset_bytes_per_token(prefix) is None
    (tmp_path / "x_text_document.stats.json").write_text(json.dumps({"documents": 3, "tokens": 40, "bytes": 150}))
    assert dataset_bytes_per_token(prefix) == pytest.approx(3.75)
    (tmp_path / "x_text_document.stats.json").write_text("{not json")
    with pytest.raises(DataError, match="x_text_document.stats.json: not a readable JSON file"):
        dataset_bytes_per_token(prefix)
    for content in ("[40, 150]", json.dumps({"tokens": "40", "bytes": 150}), json.dumps({"bytes": 150})):
        (tmp_path / "x_text_document.stats.json").write_text(content)
        with pytest.raises(DataError, match="x_text_document.stats.json: expected .*delete the file"):
            dataset_bytes_per_token(prefix)


def _distributed_build(rank: int, world_size: int, prefix: str, cache: str, init_file: str, out_dir: str) -> None:
    """One rank of test_rank_zero_builds_and_others_load (run in a forked process)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    real_build = gpt_dataset.build_gpt_indices
    log = os.path.join(out_dir, f"rank{rank}.json")

    def logged_build(*args, **kwargs):
        with open(os.path.join(out_dir, f"built_by_{rank}"), "w"):
            pass
        return real_build(*args, **kwargs)

    def failing_build(*args, **kwargs):
        raise RuntimeError("disk full")

    result = {}
    gpt_dataset.build_gpt_indices = logged_build
    ds = GPTDataset(IndexedDataset(prefix), "train", (0, 40), 8, 25, seed=11, cache_dir=cache)
    result["tokens"] = [ds[i]["tokens"].tolist() for i in range(len(ds))]
    gpt_dataset.build_gpt_indices = failing_build
    try:
        GPTDataset(IndexedDataset(prefix), "train", (0, 40), 8, 26, seed=11, cache_dir=cache)
    except Exception as e:  # every rank must return with an error, none may hang at the barrier
        result["error"] = f"{type(e).__name__}: {e}"
    with open(log, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_rank_zero_builds_and_others_load(corpus, tmp_path):
    import multiprocessing

    import torch.distributed  # noqa: F401  (imported once here; forked ranks inherit it)

    _, indexed = corpus
    cache, out = str(tmp_path / "cache"), tmp_path / "out"
    out.mkdir()
    ctx = multiprocessing.get_context("fork")
    ranks = [ctx.Process(target=_distributed_build,
                         args=(r, 2, indexed.prefix, cache, str(tmp_path / "init"), str(out))) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(f.name for f in out.glob("built_by_*")) == ["built_by_0"]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    local = GPTDataset(indexed, "train", (0, 40), 8, 25, seed=11, cache_dir=str(tmp_path / "local"))
    expected = [local[i]["tokens"].tolist() for i in range(25)]
    assert results[0]["tokens"] == results[1]["tokens"] == expected
    assert "disk full" in results[0]["error"]
    assert results[1]["error"].startswith("DataError") and "data.cache_dir" in results[1]["error"]


def test_preprocessed_corpus_end_to_end(tiny_dataset_prefix, tiny_tokenizer):
    cfg = config_for(tiny_dataset_prefix, split="9,1,0")
    cfg.model.seq_len = 32
    datasets = build_datasets(cfg, {"train": 40, "valid": 8})
    indexed = datasets["train"].indexed
    stream = np.concatenate([indexed[int(s)] for s in datasets["valid"].document_index]).astype(np.int64)
    valid = datasets["valid"]
    for i in range(len(valid)):
        j = int(valid.shuffle_index[i])
        assert valid[i]["tokens"].tolist() == stream[j * 32: j * 32 + 33].tolist()
    assert all(t < tiny_tokenizer.vocab_size for t in datasets["train"][0]["tokens"].tolist())
    bytes_per_token = dataset_bytes_per_token(tiny_dataset_prefix)
    assert bytes_per_token is not None and 1.0 < bytes_per_token < 8.0
