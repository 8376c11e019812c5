"""Document readers: .jsonl/.json, .txt, .parquet, Hugging Face datasets, and the built-in `sample` corpus.

Inputs are resolved up front (`resolve_inputs`), so a missing file or an unloadable dataset fails
before any work. Reading then streams documents one at a time; each names where it came from.
Problems are never dropped quietly: a malformed JSON line stops the run (or, with skip_bad, is
skipped and counted); missing keys, non-text values and empty documents are skipped and counted per
reason; invalid UTF-8 is decoded with replacement characters and counted.

Input forms:
    path.jsonl / path.json   one JSON object per line; the text is under `key`
    path.txt (or .py)        the whole file is one document
    path.parquet             one document per row, column `key`
    DIR                      a `datasets` save_to_disk directory, otherwise every supported file
                             below it (recursively, sorted)
    GLOB (*, ?, [)           the matching files, sorted
    sample | sample:N        the running interpreter's standard-library .py files (first N)
    hf:NAME[:SPLIT] or NAME  a Hugging Face dataset (streamed), split "train" by default
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

from megamu.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json")
FILE_SUFFIXES = JSON_SUFFIXES + (".txt", ".parquet")
SAMPLE = "sample"

# Skip reasons, as reported in summaries and stats files.
MALFORMED_JSON = "malformed_json"
MISSING_KEY = "missing_key"
NOT_TEXT = "not_text"
EMPTY = "empty"


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # file path or dataset name
    line: int  # 1-based line of a .jsonl, row of a table, 1 for a whole-file document
    nbytes: int  # UTF-8 size of text

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class ReadReport:
    """What reading saw: documents yielded, skipped per reason, and those repaired from invalid UTF-8."""
    yielded: int = 0
    skipped: Counter = field(default_factory=Counter)
    invalid_utf8: int = 0
    first_skipped: dict = field(default_factory=dict)  # reason -> where it first happened, for messages


@dataclass(frozen=True)
class Source:
    """One resolved input: a name for messages and a function yielding (line, raw value) pairs."""
    name: str
    kind: str  # "jsonl", "text", "parquet", "dataset"
    rows: Callable[[str], Iterator[tuple[int, Any]]]


class MalformedInputError(DataError):
    """A record that cannot be parsed; the message names file and line."""


# ---- resolving inputs -------------------------------------------------------------------------
def sample_files(limit: Optional[int] = None) -> list[str]:
    """The running interpreter's standard-library .py files, sorted by path relative to the stdlib."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        rel_dir = directory[len(root) + 1:]  # os.path.relpath per file costs more than the walk
        found.extend(os.path.join(rel_dir, f) for f in files if f.endswith(".py"))
    found.sort()
    if limit is not None:
        found = found[:limit]
    return [os.path.join(root, rel) for rel in found]


def resolve_inputs(inputs: Iterable[str]) -> list[Source]:
    """Expand every input into sources, failing now (naming the input) if one cannot be read."""
    sources: list[Source] = []
    for spec in inputs:
        sources.extend(_resolve(spec))
    if not sources:
        raise DataError("no inputs given; pass files, globs, directories, `sample` or a dataset name")
    return sources


def _resolve(spec: str) -> list[Source]:
    if spec == SAMPLE or spec.startswith(SAMPLE + ":"):
        limit = _sample_limit(spec)
        return [_file_source(path) for path in sample_files(limit)]
    if spec.startswith("hf:"):
        return [_hf_source(spec[3:])]
    if any(ch in spec for ch in "*?["):
        matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"input {spec!r} matched no files")
        return [_file_source(p) for p in matches]
    if os.path.isdir(spec):
        if _is_saved_dataset(spec):
            return [_saved_dataset_source(spec)]
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs if f.endswith(FILE_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"input directory {spec} holds no {'/'.join(FILE_SUFFIXES)} files")
        return [_file_source(p) for p in files]
    if os.path.isfile(spec):
        return [_file_source(spec)]
    looks_like_path = spec.endswith(FILE_SUFFIXES) or (os.sep in spec and os.path.isdir(os.path.dirname(spec)))
    if looks_like_path:
        raise FileNotFoundError(f"input file {spec} not found")
    return [_hf_source(spec)]


def _sample_limit(spec: str) -> Optional[int]:
    if spec == SAMPLE:
        return None
    count = spec[len(SAMPLE) + 1:]
    if not count.isdigit() or int(count) == 0:
        raise DataError(f"input {spec!r}: write `sample` or `sample:N` with N a positive number of files")
    return int(count)


def _file_source(path: str) -> Source:
    if path.endswith(JSON_SUFFIXES):
        return Source(path, "jsonl", lambda key: _jsonl_rows(path))
    if path.endswith(".parquet"):
        return Source(path, "parquet", lambda key: _parquet_rows(path, key))
    if path.endswith((".txt", ".py")):
        return Source(path, "text", lambda key: _whole_file(path))
    raise DataError(f"input {path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")


def _is_saved_dataset(path: str) -> bool:
    names = ("dataset_info.json", "state.json", "dataset_dict.json")
    return any(os.path.isfile(os.path.join(path, n)) for n in names)


def _saved_dataset_source(path: str) -> Source:
    import datasets  # heavy import, only when a dataset is used

    try:
        data = datasets.load_from_disk(path)
    except Exception as err:  # datasets raises many types; the message below is what matters
        raise DataError(f"input {path}: not a loadable `datasets` directory ({err})") from err
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(f"input {path}: dataset has splits {list(data)} but no 'train'; point at one split")
        data = data["train"]
    return Source(path, "dataset", lambda key: _dataset_rows(data, path, key))


def _hf_source(spec: str) -> Source:
    import datasets

    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        data = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:
        raise FileNotFoundError(f"input {spec!r} is neither a file, a directory nor a loadable Hugging Face "
                                f"dataset ({type(err).__name__}: {err})") from err
    return Source(spec, "dataset", lambda key: _dataset_rows(data, spec, key))


# ---- raw rows ----------------------------------------------------------------------------------
def _whole_file(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        yield 1, f.read()


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


def _parquet_rows(path: str, key: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except pa.ArrowException as err:
        raise DataError(f"input {path}: not a readable Parquet file ({err})") from err
    columns = table.schema_arrow.names
    if key not in columns:
        raise DataError(f"{path}: no column {key!r}; columns are {columns}; pass --json-keys with one of them")
    row = 0
    for batch in table.iter_batches(columns=[key], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield row, value


def _dataset_rows(data: Any, name: str, key: str) -> Iterator[tuple[int, Any]]:
    features = getattr(data, "features", None)
    if features is not None and key not in features:
        raise DataError(f"{name}: no column {key!r}; columns are {list(features)}; pass --json-keys with one of them")
    for row, record in enumerate(data, start=1):
        yield row, record.get(key)


# ---- documents ---------------------------------------------------------------------------------
_SKIP = object()  # a record already counted as skipped


def iter_documents(sources: Iterable[Source], key: str = "text", report: Optional[ReadReport] = None,
                   skip_bad: bool = False, max_documents: Optional[int] = None) -> Iterator[Document]:
    """Documents from the sources in order, under `key` for keyed inputs; counts go to `report`."""
    report = report if report is not None else ReadReport()
    docs = (doc for source in sources for doc in _source_documents(source, key, report, skip_bad))
    return itertools.islice(docs, max_documents)


def _readable_rows(source: Source, key: str) -> Iterator[tuple[int, Any]]:
    """The source's rows; an input the OS cannot read (permissions, a vanished file) is a DataError naming it."""
    try:
        yield from source.rows(key)
    except OSError as err:
        raise DataError(f"input {source.name} cannot be read ({err}); check that it exists and is readable") from err


def _source_documents(source: Source, key: str, report: ReadReport, skip_bad: bool) -> Iterator[Document]:
    for line, raw in _readable_rows(source, key):
        where = f"{source.name}:{line}"
        value = raw
        if source.kind == "jsonl":
            value = _json_value(raw, key, where, report, skip_bad)
            if value is _SKIP:
                continue
        if isinstance(value, bytes):
            value = _decode(value, report)
        if value is None:
            _skip(report, MISSING_KEY, where)
            continue
        if not isinstance(value, str):
            _skip(report, NOT_TEXT, where)
            continue
        try:
            nbytes = len(value.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates, e.g. from a "\ud800" JSON escape
            value = value.encode("utf-8", "replace").decode("utf-8")
            nbytes = len(value.encode("utf-8"))
            report.invalid_utf8 += 1
        if not value.strip():
            _skip(report, EMPTY, where)
            continue
        report.yielded += 1
        yield Document(value, source.name, line, nbytes)



def _json_value(raw: bytes, key: str, where: str, report: ReadReport, skip_bad: bool) -> Any:
    text = _decode(raw, report)
    if not text.strip():
        _skip(report, EMPTY, where)
        return _SKIP
    try:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    except ValueError as err:
        if skip_bad:
            _skip(report, MALFORMED_JSON, where)
            return _SKIP
        raise MalformedInputError(f"{where}: malformed JSON line ({err}); fix the line or pass --skip-bad "
                                  f"to skip and count such lines") from None
    return record.get(key)


def _decode(raw: bytes, report: ReadReport) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.invalid_utf8 += 1
        return raw.decode("utf-8", "replace")


def _skip(report: ReadReport, reason: str, where: str) -> None:
    report.skipped[reason] += 1
    report.first_skipped.setdefault(reason, where)


def iter_texts(inputs: Iterable[str], json_keys: Iterable[str] = ("text",), report: Optional[ReadReport] = None,
               skip_bad: bool = False, max_documents: Optional[int] = None) -> Iterator[str]:
    """Texts of every document under each key in turn (inputs resolved before the first is read)."""
    sources = resolve_inputs(inputs)
    report = report if report is not None else ReadReport()
    texts = (doc.text for key in json_keys for doc in iter_documents(sources, key, report, skip_bad=skip_bad))
    return itertools.islice(texts, max_documents)
