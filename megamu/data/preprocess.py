"""Tokenize documents into Megatron-style PREFIX_<key>_document.{bin,idx}, in parallel and streaming.

Documents stream from the sources in chunks; worker processes encode chunks while the main
process reads ahead and writes results in input order, so the output is byte-identical for any
number of workers. At most a few chunks per worker are in flight, so memory stays bounded
whatever the input size. Every check that can fail (inputs, tokenizer, output directory) runs
before the first document is read.
"""
from __future__ import annotations

import json
import multiprocessing as mp
from multiprocessing.pool import Pool
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from megamu.data.indexed import IndexedDatasetWriter, best_dtype, merge_datasets
from megamu.data.sources import Document, ReadReport, Source, iter_documents, resolve_inputs
from megamu.data.tokenizer import Tokenizer
from megamu.errors import ConfigError, DataError
from megamu.fileio import atomic_write, check_output_directory, file_sha256, remove_stale_temporaries

CHUNK_DOCUMENTS = 256
CHUNK_BYTES = 256 << 10  # small enough to balance the workers to the end of the input
IN_FLIGHT_PER_WORKER = 4  # enough to keep workers busy while the main process reads and writes


@dataclass
class PreprocessSummary:
    key: str
    output_prefix: str  # PREFIX_<key>_document: the data prefix a training config points at
    documents_read: int
    documents_written: int
    skipped: dict = field(default_factory=dict)  # reason -> count
    invalid_utf8: int = 0  # documents kept after decoding invalid UTF-8 with replacement characters
    tokens: int = 0  # tokens written, end-of-document tokens included
    bytes: int = 0  # UTF-8 bytes of the documents written
    seconds: float = 0.0
    workers: int = 1

    @property
    def docs_per_s(self) -> float:
        return self.documents_written / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def format(self) -> str:
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"{self.output_prefix}.{{bin,idx}}\n"
                f"  documents: read {self.documents_read}, written {self.documents_written}, "
                f"skipped {sum(self.skipped.values())} ({skipped}), invalid UTF-8 repaired {self.invalid_utf8}\n"
                f"  tokens {self.tokens:,}, bytes {self.bytes:,} ({self.bytes / max(self.tokens, 1):.2f} bytes/token)\n"
                f"  {self.seconds:.2f} s with {self.workers} worker(s): {self.docs_per_s:,.0f} docs/s, "
                f"{self.tokens_per_s:,.0f} tokens/s, {self.mb_per_s:.2f} MB/s")


def document_prefix(output_prefix: str, key: str) -> str:
    """Megatron's naming: the data prefix for one JSON key."""
    return f"{output_prefix}_{key}_document"


def stats_path(data_prefix: str) -> str:
    return f"{data_prefix}.stats.json"


# ---- encoding (runs in worker processes, or in-process with one worker) -------------------------
_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path)


def _encode_chunk(texts: list[str], eod_id: Optional[int], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    return _encode(_worker_tokenizer, texts, eod_id, dtype)


def _encode(tokenizer: Tokenizer, texts: list[str], eod_id: Optional[int],
            dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Encode texts; return their tokens concatenated (EOD after each when eod_id is set) and lengths."""
    ids = tokenizer.encode_batch(texts)
    extra = 0 if eod_id is None else 1
    lengths = np.fromiter((len(x) + extra for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for x in ids:
        tokens[pos:pos + len(x)] = x
        pos += len(x)
        if eod_id is not None:
            tokens[pos] = eod_id
            pos += 1
    return tokens, lengths


def _chunks(documents: Iterable[Document]) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    size = 0
    for doc in documents:
        chunk.append(doc)
        size += doc.nbytes
        if len(chunk) >= CHUNK_DOCUMENTS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


Encoded = tuple[list[Document], np.ndarray, np.ndarray]  # a chunk, its tokens concatenated, their lengths


def _encoded_in_order(chunks: Iterator[list[Document]], tokenizer: Tokenizer, pool: Optional[Pool],
                      eod_id: Optional[int], dtype: np.dtype, workers: int) -> Iterator[Encoded]:
    """(chunk, tokens, lengths) in input order. Pool.imap would read the whole input ahead into
    memory; a bounded window of async tasks keeps memory flat and order intact."""
    if pool is None:
        for chunk in chunks:
            yield (chunk, *_encode(tokenizer, [d.text for d in chunk], eod_id, dtype))
        return
    window: deque = deque()
    for chunk in chunks:
        window.append((chunk, pool.apply_async(_encode_chunk, ([d.text for d in chunk], eod_id, dtype))))
        if len(window) >= IN_FLIGHT_PER_WORKER * workers:
            done, result = window.popleft()
            yield (done, *result.get())
    while window:
        done, result = window.popleft()
        yield (done, *result.get())


# ---- the tool ----------------------------------------------------------------------------------
def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_model: str,
               json_keys: Sequence[str] = ("text",), workers: int = 1, append_eod: bool = False,
               skip_bad: bool = False, max_documents: Optional[int] = None,
               progress: bool = True) -> dict[str, PreprocessSummary]:
    """Tokenize `inputs` into PREFIX_<key>_document.{bin,idx} (+ .stats.json) for each key."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if not json_keys:
        raise ValueError("json_keys is empty; pass at least one key, e.g. text")
    check_output_directory(output_prefix, "--output-prefix")
    tokenizer = Tokenizer(tokenizer_model)
    eod_id = tokenizer.eod_id if append_eod else None
    sources = resolve_inputs(inputs)
    dtype = best_dtype(tokenizer.vocab_size)

    pool = mp.get_context().Pool(workers, _init_worker, (tokenizer_model,)) if workers > 1 else None
    try:
        summaries = {}
        for key in json_keys:
            summaries[key] = _preprocess_key(sources, key, document_prefix(output_prefix, key), tokenizer, dtype,
                                             pool, workers, eod_id, skip_bad, max_documents, progress)
        return summaries
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _preprocess_key(sources: list[Source], key: str, data_prefix: str, tokenizer: Tokenizer, dtype: np.dtype,
                    pool: Optional[Pool], workers: int, eod_id: Optional[int], skip_bad: bool,
                    max_documents: Optional[int], progress: bool) -> PreprocessSummary:
    report = ReadReport()
    documents = iter_documents(sources, key, report, skip_bad=skip_bad, max_documents=max_documents)
    start = time.perf_counter()
    written = n_tokens = n_bytes = 0
    max_token_id = -1
    with IndexedDatasetWriter(data_prefix, dtype) as writer:
        bar = tqdm(desc=f"tokenizing {key}", unit="doc", disable=not progress, smoothing=0.1)
        for chunk, tokens, lengths in _encoded_in_order(_chunks(documents), tokenizer, pool, eod_id, dtype, workers):
            writer.add_documents(tokens, lengths)
            written += len(chunk)
            n_tokens += tokens.size
            if tokens.size:
                max_token_id = max(max_token_id, int(tokens.max()))
            n_bytes += sum(d.nbytes for d in chunk)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.update(len(chunk))
            bar.set_postfix_str(f"{n_tokens / elapsed:,.0f} tok/s, {n_bytes / 1e6 / elapsed:.1f} MB/s", refresh=False)
        bar.close()
        if written == 0:
            first = ", ".join(f"{r} first at {w}" for r, w in report.first_skipped.items())
            raise DataError(f"no documents to write for key {key!r} (skipped: {dict(report.skipped)}"
                             f"{'; ' + first if first else ''}); check the inputs and --json-keys")
    summary = PreprocessSummary(key=key, output_prefix=data_prefix,
                                documents_read=written + sum(report.skipped.values()), documents_written=written,
                                skipped=dict(report.skipped), invalid_utf8=report.invalid_utf8, tokens=n_tokens,
                                bytes=n_bytes, seconds=time.perf_counter() - start, workers=workers)
    _write_stats(data_prefix, {
        "documents": written, "tokens": n_tokens, "bytes": n_bytes, "skipped": summary.skipped,
        "invalid_utf8": summary.invalid_utf8, "append_eod": eod_id is not None,
        "tokenizer": os.path.abspath(tokenizer.model_path), "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": file_sha256(tokenizer.model_path), "max_token_id": max_token_id,
    })
    return summary


def _write_stats(data_prefix: str, stats: dict) -> None:
    remove_stale_temporaries(f"{stats_path(data_prefix)}.*.tmp")
    with atomic_write(stats_path(data_prefix)) as f:
        json.dump(stats, f, indent=2, sort_keys=True)
        f.write("\n")


def read_stats(data_prefix: str) -> Optional[dict]:
    """The sidecar statistics of a data prefix, or None if it has none (e.g. made by Megatron's tools)."""
    path = stats_path(data_prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            stats = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise DataError(f"{path}: not a readable JSON file ({err}); re-run megamu-preprocess or delete the "
                        f"file") from None
    if not isinstance(stats, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(stats).__name__}; re-run megamu-preprocess "
                        f"or delete the file")
    return stats


def merge(prefixes: Sequence[str], output_prefix: str) -> Optional[dict]:
    """Concatenate data prefixes into OUTPUT_PREFIX.{bin,idx}; returns the merged statistics, or None
    (and writes no sidecar) when an input has none or the inputs used different tokenizers."""
    check_output_directory(output_prefix, "--output-prefix")
    merge_datasets(prefixes, output_prefix)
    parts = [read_stats(p) for p in prefixes]
    if any(p is None for p in parts) or len({(p["tokenizer"], p["vocab_size"]) for p in parts}) != 1:
        if os.path.exists(stats_path(output_prefix)):
            os.remove(stats_path(output_prefix))  # a stale sidecar would describe other data
        return None
    skipped: dict = {}
    for part in parts:
        for reason, n in part["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    stats = {key: sum(p[key] for p in parts) for key in ("documents", "tokens", "bytes", "invalid_utf8")}
    stats.update(skipped=skipped, append_eod=all(p["append_eod"] for p in parts),
                 tokenizer=parts[0]["tokenizer"], vocab_size=parts[0]["vocab_size"])
    # Sidecars written before these keys existed lack them; the trainer then scans the data instead.
    digests = {p.get("tokenizer_sha256") for p in parts}
    if len(digests) == 1 and None not in digests:
        stats["tokenizer_sha256"] = digests.pop()
    max_ids = [p.get("max_token_id") for p in parts]
    if None not in max_ids:
        stats["max_token_id"] = max(max_ids)
    _write_stats(output_prefix, stats)
    return stats
