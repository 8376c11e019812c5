"""Train a lossless byte-fallback BPE SentencePiece model from any supported input.

    megamu-train-tokenizer --input sample:200 --vocab-size 4096 --model-prefix data/tok
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from megamu.cli import ArgumentParser, console_script
from megamu.data.sources import ReadReport, iter_texts
from megamu.data.tokenizer import BOS_ID, EOD_ID, PAD_ID, UNK_ID, train_tokenizer


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="files, globs, directories, `sample[:N]` or a Hugging Face dataset name")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding the text in JSON/table inputs")
    p.add_argument("--max-sentences", type=int, default=100_000,
                   help="cap on training sentences (documents or line-aligned pieces of long ones)")
    p.add_argument("--max-documents", type=int, default=None, help="read at most this many documents")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed JSON lines instead of stopping")
    return p.parse_args(argv)


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    report = ReadReport()
    texts = iter_texts(args.input, args.json_keys, report, args.skip_bad, args.max_documents)
    model = train_tokenizer(texts, args.model_prefix, args.vocab_size, max_sentences=args.max_sentences,
                            character_coverage=args.character_coverage)
    skipped = ", ".join(f"{r} {n}" for r, n in sorted(report.skipped.items())) or "none"
    print(f"wrote {model} (vocab {args.vocab_size}; ids: unk {UNK_ID}, bos {BOS_ID}, eos/eod {EOD_ID}, pad {PAD_ID})")
    print(f"documents read {report.yielded}, skipped {sum(report.skipped.values())} ({skipped}), "
          f"invalid UTF-8 repaired {report.invalid_utf8}")
    return 0
