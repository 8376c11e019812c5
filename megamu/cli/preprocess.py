"""Tokenize documents into Megatron-compatible PREFIX_<key>_document.{bin,idx}, or merge such datasets.

    megamu-preprocess --input sample:200 --output-prefix data/sample \\
        --tokenizer-model data/tok.model --workers 2 --append-eod
    megamu-preprocess --merge data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from megamu.cli import ArgumentParser, console_script
from megamu.data.preprocess import merge, preprocess


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", nargs="+",
                      help="files, globs, directories, `sample[:N]` or a Hugging Face dataset name")
    what.add_argument("--merge", nargs="+", metavar="PREFIX",
                      help="data prefixes to concatenate into --output-prefix (used as given, no suffix added)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-model", help="SentencePiece .model (required with --input)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="one output dataset per key")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document id to every document")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed JSON lines instead of stopping")
    p.add_argument("--max-documents", type=int, default=None, help="write at most this many documents per key")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.input and not args.tokenizer_model:
        p.error("--tokenizer-model is required with --input")
    return args


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.merge:
        stats = merge(args.merge, args.output_prefix)
        print(f"merged {len(args.merge)} datasets into {args.output_prefix}.{{bin,idx}}")
        print(f"  {stats['documents']} documents, {stats['tokens']:,} tokens" if stats else
              "  no .stats.json written: an input has none, or the inputs used different tokenizers")
        return 0
    summaries = preprocess(args.input, args.output_prefix, args.tokenizer_model, args.json_keys,
                           workers=args.workers, append_eod=args.append_eod, skip_bad=args.skip_bad,
                           max_documents=args.max_documents, progress=not args.no_progress)
    for summary in summaries.values():
        print(summary.format())
    return 0
