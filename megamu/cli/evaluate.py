"""Evaluate a megamu checkpoint: exact bits per byte and loss on the validation split.

    megamu-eval RUN_DIR [--tag global_stepN] [--max-documents N] [--batch-size B] [--json OUT]

Every validation document (data.split's valid range of each data prefix) is scored whole and its bits
divided by its own UTF-8 bytes, not by a dataset-average bytes-per-token.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

from megamu.cli import ArgumentParser, add_checkpoint_arguments, console_script
from megamu.data.tokenizer import Tokenizer
from megamu.errors import ConfigError, DataError
from megamu.export.bpb import exact_bits_per_byte
from megamu.export.source import load_run_model, tokenizer_model
from megamu.fileio import atomic_write


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(parser)
    parser.add_argument("--max-documents", type=int, default=None, help="score only the first N documents")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    cfg, model, tag = load_run_model(args.run_dir, args.tag)
    result = exact_bits_per_byte(model, cfg, Tokenizer(tokenizer_model(cfg, args.run_dir)), args.max_documents,
                                 args.batch_size)
    if result.documents == 0:
        raise DataError(f"the validation split (data.split={cfg.data.split!r}) of {args.run_dir}'s data has no "
                        f"documents; give the valid split a weight")
    record = {"tag": tag, "documents": result.documents, "tokens": result.tokens, "bytes": result.bytes,
              "val_loss": result.loss, "val_bpb": result.bpb}
    print(f"{args.run_dir} {tag}: {result.documents} validation documents, {result.tokens:,} tokens, "
          f"{result.bytes:,} bytes | loss {result.loss:.4f} nats/token | {result.bpb:.4f} bits/byte")
    if args.json:
        with atomic_write(args.json) as f:
            json.dump(record, f, indent=1)
    return 0
