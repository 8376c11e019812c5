"""Preprocessing: exact round trips, deterministic output for any worker count, every bad-input case
counted or refused with a message naming where, merge, and the command-line tool."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from megamu.data import preprocess as pp
from megamu.data.indexed import IndexedDataset
from megamu.data.sources import (MalformedInputError, ReadReport, iter_documents, resolve_inputs, sample_files)
from megamu.errors import DataError
from conftest import TINY_DATASET_DOCS
from scripts import script
from test_indexed import read_mmidx_from_spec


def write_jsonl(path, lines: list) -> str:
    """Objects are JSON-encoded; str and bytes lines are written verbatim (to plant bad records)."""
    with open(path, "wb") as f:
        for line in lines:
            if not isinstance(line, (str, bytes)):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


def run(tmp_path, inputs, tokenizer, name="out", **kwargs) -> pp.PreprocessSummary:
    summaries = pp.preprocess(inputs, str(tmp_path / name), tokenizer.model_path, progress=False, **kwargs)
    return summaries["text"]


def test_round_trip_every_document(tiny_dataset_prefix, tiny_tokenizer):
    docs = list(iter_documents(resolve_inputs([TINY_DATASET_DOCS])))
    eod = tiny_tokenizer.eod_id
    dtype, seqs, doc_idx = read_mmidx_from_spec(tiny_dataset_prefix)  # independent reader
    ds = IndexedDataset(tiny_dataset_prefix)
    assert dtype == np.uint16 and len(seqs) == len(ds) == len(docs) and doc_idx.tolist() == list(range(len(docs) + 1))
    for doc, seq, i in zip(docs, seqs, range(len(ds))):
        expected = tiny_tokenizer.encode(doc.text) + [eod]
        assert seq.tolist() == expected and ds[i].tolist() == expected
        assert tiny_tokenizer.decode(ds[i][:-1]) == doc.text

    stats = pp.read_stats(tiny_dataset_prefix)
    assert stats["documents"] == len(docs) and stats["tokens"] == int(ds.sizes.sum())
    assert stats["bytes"] == sum(len(d.text.encode()) for d in docs) and stats["append_eod"] is True
    assert stats["vocab_size"] == tiny_tokenizer.vocab_size


def test_output_identical_for_one_and_two_workers(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(pp, "CHUNK_DOCUMENTS", 3)  # many chunks, so ordering across workers is exercised
    one = run(tmp_path, ["sample:25"], tiny_tokenizer, "w1", workers=1, append_eod=True)
    two = run(tmp_path, ["sample:25"], tiny_tokenizer, "w2", workers=2, append_eod=True)
    for ext in (".bin", ".idx"):
        with open(one.output_prefix + ext, "rb") as a, open(two.output_prefix + ext, "rb") as b:
            assert a.read() == b.read()
    expected_docs = len(list(iter_documents(resolve_inputs(["sample:25"]))))
    assert one.tokens == two.tokens and one.documents_written == two.documents_written == expected_docs


def test_jsonl_bad_records_are_counted_by_reason(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "good one"},
        {"title": "no text key"},
        {"text": ""},
        {"text": "  \n\t "},
        {"text": 42},
        {"text": None},
        b'{"text": "bad \xff byte"}',
        "",
        {"text": "good two\n"},
    ])
    docs = list(iter_documents(resolve_inputs([path])))
    assert [(d.source, d.line) for d in docs] == [(path, 1), (path, 7), (path, 9)]  # where each came from
    s = run(tmp_path, [path], tiny_tokenizer)
    assert s.documents_written == 3 and s.documents_read == 9
    assert s.skipped == {"missing_key": 2, "empty": 3, "not_text": 1}
    assert s.invalid_utf8 == 1
    ds = IndexedDataset(s.output_prefix)
    assert tiny_tokenizer.decode(ds[1]) == "bad \ufffd byte"
    assert pp.read_stats(s.output_prefix)["skipped"] == s.skipped


def test_malformed_json_stops_naming_file_and_line(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "unterminated', {"text": "c"}])
    with pytest.raises(MalformedInputError, match=r"d\.jsonl:3: malformed JSON"):
        run(tmp_path, [path], tiny_tokenizer)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("out")]  # nothing half-written

    s = run(tmp_path, [path], tiny_tokenizer, skip_bad=True)
    assert s.documents_written == 3 and s.skipped == {"malformed_json": 1}


def test_json_array_line_is_malformed(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [["not", "an", "object"]])
    with pytest.raises(MalformedInputError, match="expected a JSON object"):
        run(tmp_path, [path], tiny_tokenizer)


def test_lone_surrogate_is_repaired_and_counted(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "half \\ud800 pair"}'])
    s = run(tmp_path, [path], tiny_tokenizer)
    assert s.invalid_utf8 == 1 and s.documents_written == 1


def test_txt_files_directories_and_globs_in_sorted_order(tmp_path, tiny_tokenizer):
    data = tmp_path / "txt"
    (data / "sub").mkdir(parents=True)
    (data / "b.txt").write_text("second file\n")
    (data / "a.txt").write_text("first file\n  indented\n")
    (data / "sub" / "c.txt").write_text("third, in a subdirectory")
    (data / "empty.txt").write_text("   \n")
    for inputs in ([str(data)], [str(data / "**" / "*.txt")]):
        report = ReadReport()
        texts = [d.text for d in iter_documents(resolve_inputs(inputs), report=report)]
        assert texts == ["first file\n  indented\n", "second file\n", "third, in a subdirectory"]
        assert report.skipped == {"empty": 1}


def test_parquet(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"text": ["row one", None, "row three"], "id": [1, 2, 3]}), path)
    s = run(tmp_path, [path], tiny_tokenizer)
    assert s.documents_written == 2 and s.skipped == {"missing_key": 1}
    assert tiny_tokenizer.decode(IndexedDataset(s.output_prefix)[1]) == "row three"
    with pytest.raises(DataError, match=r"no column 'body'; columns are \['text', 'id'\]"):
        pp.preprocess([path], str(tmp_path / "x"), tiny_tokenizer.model_path, json_keys=["body"], progress=False)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        list(iter_documents(resolve_inputs([str(tmp_path / "junk.parquet")])))


def test_an_input_that_cannot_be_read_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "gone.jsonl", [{"text": "x"}])
    sources = resolve_inputs([path])
    os.remove(path)  # gone between resolving and reading: the OSError an unreadable file gives too
    with pytest.raises(DataError, match="input .*gone.jsonl cannot be read"):
        list(iter_documents(sources))


def test_local_hf_dataset_directory(tmp_path, tiny_tokenizer):
    import datasets

    directory = str(tmp_path / "hf")
    datasets.Dataset.from_dict({"text": ["alpha doc", "beta doc", ""]}).save_to_disk(directory)
    s = run(tmp_path, [directory], tiny_tokenizer)
    assert s.documents_written == 2 and s.skipped == {"empty": 1}
    ds = IndexedDataset(s.output_prefix)
    assert [tiny_tokenizer.decode(ds[i]) for i in range(2)] == ["alpha doc", "beta doc"]


def test_multiple_keys_write_one_dataset_each(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "body", "title": "head"}, {"text": "body two"}])
    out = pp.preprocess([path], str(tmp_path / "o"), tiny_tokenizer.model_path, json_keys=["text", "title"],
                        progress=False)
    assert out["text"].output_prefix.endswith("o_text_document") and out["text"].documents_written == 2
    assert out["title"].output_prefix.endswith("o_title_document") and out["title"].skipped == {"missing_key": 1}


def test_max_documents_and_sample_cap(tmp_path, tiny_tokenizer):
    assert len(sample_files(7)) == 7 and sample_files(7) == sample_files()[:7]
    s = run(tmp_path, ["sample:40"], tiny_tokenizer, max_documents=5)
    assert s.documents_written == 5 and len(IndexedDataset(s.output_prefix)) == 5


@pytest.mark.parametrize("case, error, message", [
    ("missing input", FileNotFoundError, "input file .*nope.jsonl not found"),
    ("empty glob", FileNotFoundError, "matched no files"),
    ("bad sample count", DataError, "sample:N"),
    ("missing tokenizer", FileNotFoundError, "absent.model not found"),
    ("corrupt tokenizer", DataError, "bad.model is not a readable SentencePiece model"),
    ("missing output dir", FileNotFoundError, "output directory .*missing does not exist"),
    ("nothing to write", DataError, "no documents to write for key 'text'"),
])
def test_errors_before_work(tmp_path, tiny_tokenizer, case, error, message):
    (tmp_path / "bad.model").write_bytes(b"junk")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": " "}])
    inputs, model, out = ["sample:2"], tiny_tokenizer.model_path, str(tmp_path / "out")
    if case == "missing input":
        inputs = [str(tmp_path / "nope.jsonl")]
    elif case == "empty glob":
        inputs = [str(tmp_path / "*.parquet")]
    elif case == "bad sample count":
        inputs = ["sample:x"]
    elif case == "missing tokenizer":
        model = str(tmp_path / "absent.model")
    elif case == "corrupt tokenizer":
        model = str(tmp_path / "bad.model")
    elif case == "missing output dir":
        out = str(tmp_path / "missing" / "out")
    elif case == "nothing to write":
        inputs = [empty]
    with pytest.raises(error, match=message):
        pp.preprocess(inputs, out, model, progress=False)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("out")]


def test_merge_concatenates_and_sums_stats(tmp_path, tiny_tokenizer):
    a = run(tmp_path, ["sample:4"], tiny_tokenizer, "a", append_eod=True)
    b = run(tmp_path, [write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}, {}])], tiny_tokenizer, "b", append_eod=True)
    merged = str(tmp_path / "ab_text_document")
    stats = pp.merge([a.output_prefix, b.output_prefix], merged)
    ds, da, db = IndexedDataset(merged), IndexedDataset(a.output_prefix), IndexedDataset(b.output_prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == \
        [da[i].tolist() for i in range(len(da))] + [db[i].tolist() for i in range(len(db))]
    assert stats == pp.read_stats(merged)
    assert stats["documents"] == a.documents_written + b.documents_written
    assert stats["tokens"] == a.tokens + b.tokens and stats["skipped"] == {"missing_key": 1}


def test_command_line_tools(tmp_path, tiny_tokenizer):
    tool = script("megamu-preprocess")
    ok = subprocess.run([tool, "--input", "sample:3", "--output-prefix", str(tmp_path / "cli"),
                         "--tokenizer-model", tiny_tokenizer.model_path, "--workers", "2", "--append-eod",
                         "--no-progress"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "documents: read 3, written 3" in ok.stdout and "tokens/s" in ok.stdout
    assert len(IndexedDataset(str(tmp_path / "cli_text_document"))) == 3

    bad = subprocess.run([tool, "--input", str(tmp_path / "nope.jsonl"), "--output-prefix",
                          str(tmp_path / "x"), "--tokenizer-model", tiny_tokenizer.model_path],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "nope.jsonl not found" in bad.stderr
    bad = subprocess.run([tool, "--input", "sample:x", "--output-prefix", str(tmp_path / "x"), "--tokenizer-model",
                          tiny_tokenizer.model_path], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr

    merged = str(tmp_path / "twice_text_document")
    both = subprocess.run([tool, "--merge", str(tmp_path / "cli_text_document"),
                           str(tmp_path / "cli_text_document"), "--output-prefix", merged],
                          capture_output=True, text=True)
    assert both.returncode == 0, both.stderr
    assert "6 documents" in both.stdout and len(IndexedDataset(merged)) == 6
