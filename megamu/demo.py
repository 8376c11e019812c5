"""`make demo`: megamu end to end on the built-in sample corpus (the Python standard library's source).

Stages (each prints what it did; re-running reuses finished stages):
  1. train a SentencePiece tokenizer on the sample corpus,
  2. preprocess the corpus into Megatron-compatible .bin/.idx, print the summary and decoded samples,
  3. train the tiny μP model with the DeepSpeed engine and plot its loss curve.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from megamu.data.preprocess import document_prefix, preprocess
from megamu.data.sources import iter_texts
from megamu.data.tokenizer import Tokenizer, train_tokenizer


@dataclass
class SampleData:
    tokenizer_model: str
    data_prefix: str


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 72 - len(text)), flush=True)


def prepare_sample_data(data_dir: str = "data", documents: int = 600, vocab_size: int = 4096,
                        tokenizer_sentences: int = 20_000, workers: int = 2) -> SampleData:
    """Tokenizer + .bin/.idx for the first `documents` files of the sample corpus (reused if present).

    The defaults write data/tokenizer.model and data/sample_text_document.{bin,idx}, the paths that
    configs/tiny.yaml names; delete the folder to rebuild with other settings.
    """
    os.makedirs(data_dir, exist_ok=True)
    spec = f"sample:{documents}"
    model_prefix = os.path.join(data_dir, "tokenizer")
    tokenizer_model = model_prefix + ".model"
    if not os.path.isfile(tokenizer_model):
        banner(f"1. tokenizer: SentencePiece BPE, vocab {vocab_size}, on {spec}")
        train_tokenizer(iter_texts([spec]), model_prefix, vocab_size, max_sentences=tokenizer_sentences)
        print(f"wrote {tokenizer_model}")
    output_prefix = os.path.join(data_dir, "sample")
    data_prefix = document_prefix(output_prefix, "text")
    if not os.path.isfile(data_prefix + ".idx"):
        banner(f"2. preprocess {spec} into {data_prefix}.{{bin,idx}}")
        for summary in preprocess([spec], output_prefix, tokenizer_model, workers=workers, append_eod=True).values():
            print(summary.format())
    return SampleData(tokenizer_model=tokenizer_model, data_prefix=data_prefix)


def show_samples(data: SampleData, count: int = 2, chars: int = 240) -> None:
    """Decode the first tokens of a few documents straight from the memmapped .bin."""
    from megamu.data.indexed import IndexedDataset

    tokenizer = Tokenizer(data.tokenizer_model)
    dataset = IndexedDataset(data.data_prefix)
    print(f"{len(dataset.doc_idx) - 1} documents, {int(dataset.sizes.sum()):,} tokens, "
          f"vocab {tokenizer.vocab_size}, dtype {dataset.dtype}")
    for i in range(min(count, len(dataset))):
        text = tokenizer.decode(dataset[i][:200].tolist())
        print(f"--- document {i} (first {min(chars, len(text))} characters of its first 200 tokens) ---")
        print(text[:chars])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="demo directory (runs, plots)")
    parser.add_argument("--data-dir", default="data", help="tokenizer and preprocessed sample corpus")
    parser.add_argument("--documents", type=int, default=600, help="sample-corpus files to use")
    args = parser.parse_args(argv)
    data = prepare_sample_data(args.data_dir, documents=args.documents)
    banner("decoded samples from the memmapped dataset")
    show_samples(data)


if __name__ == "__main__":
    main()
