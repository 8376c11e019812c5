"""`make demo`: megamu end to end on the built-in sample corpus (the Python standard library's source).

Stages (each prints what it did; re-running reuses finished stages and runs):
  1. train a SentencePiece tokenizer on the sample corpus,
  2. preprocess the corpus into Megatron-compatible .bin/.idx, print the summary and decoded samples,
  3. μScaling: sweep η on the μP proxy, train a width ladder with the transferred η (each run's
     run directory has its metrics.jsonl and loss_curve.png), fit L = a·params^b + c on all but the
     largest rung and predict it and a model 8× larger (prediction.png).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from megamu.cli import ArgumentParser, console_script
from megamu.data.preprocess import document_prefix, preprocess
from megamu.data.sources import iter_texts
from megamu.data.tokenizer import Tokenizer, train_tokenizer
from megamu.shipped import shipped_path


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


# ---- μScaling stages: sweep the proxy, transfer to a width ladder, predict the largest -------
MUP_PROXY = "mup_proxy"  # the shipped config
DEMO_LRS = [2.0 ** e for e in (-9, -8, -7, -6, -5)]
DEMO_WIDTHS = [32, 48, 64, 96, 128]
# Runs see the same batches in the same order: the mean of the last 10 train records compares them fairly.
DEMO_METRIC = {"metric": "train", "smooth": 10}


def sweep_proxy(data: SampleData, out_dir: str, parallel: int) -> dict:
    """A learning-rate sweep at the proxy width; returns the sweep summary (best point in best.yaml)."""
    from megamu.scaling.launch import MetricRule
    from megamu.scaling.sweep import SweepPlan, format_best, format_table, run_sweep

    banner(f"μScaling 1/3: sweep η over {len(DEMO_LRS)} values at the proxy width (shipped config {MUP_PROXY})")
    overrides = [f"data.path={data.data_prefix}", f"data.tokenizer_model={data.tokenizer_model}"]
    plan = SweepPlan(shipped_path(MUP_PROXY), overrides, [{"train.lr": lr} for lr in DEMO_LRS], [None],
                     os.path.join(out_dir, "sweep"))
    rule = MetricRule(**DEMO_METRIC)
    results, summary = run_sweep(plan, rule, parallel)
    print(format_table(results, rule))
    print(format_best(summary))
    if summary["best"] is None:
        raise SystemExit("no sweep run finished: see the train.log files in " + plan.out_dir)
    return summary


def run_ladder(data: SampleData, out_dir: str, best_yaml: str, parallel: int) -> list:
    """The proxy's best hyper-parameters, unchanged, at every width of DEMO_WIDTHS."""
    from megamu.scaling.ladder import TokenBudget, format_ladder, plan_ladder
    from megamu.scaling.launch import MetricRule, run_all
    from megamu.scaling.sweep import overlay_overrides

    banner(f"μScaling 2/3: width ladder {DEMO_WIDTHS} with the transferred hyper-parameters ({best_yaml})")
    overrides = [f"data.path={data.data_prefix}", f"data.tokenizer_model={data.tokenizer_model}",
                 *overlay_overrides(best_yaml)]
    specs = plan_ladder(shipped_path(MUP_PROXY), overrides, DEMO_WIDTHS, TokenBudget(), os.path.join(out_dir, "ladder"))
    rule = MetricRule(**DEMO_METRIC)
    results = run_all(specs, rule, parallel)
    print(format_ladder(results, rule))
    print("loss curves: " + ", ".join(os.path.join(spec.run_dir, "loss_curve.png") for spec in specs))
    return results


def predict_largest(results: list, out_dir: str, target_mult: float = 8.0) -> dict:
    """Fit all but the largest rung; print its predicted vs actual loss and the loss at target_mult× its params."""
    from megamu.scaling.ladder import predict_ladder
    from megamu.scaling.plot import plot_prediction
    from megamu.scaling.predict import format_report

    banner(f"μScaling 3/3: fit L = a·params^b + c on all but the largest rung, predict it and {target_mult:g}× it")
    largest = max(r.labels["params"] for r in results)
    report, fit, dropped = predict_ladder(results, holdout=1, target=target_mult * largest, **DEMO_METRIC)
    for note in dropped:
        print(f"left out of the fit: {note}")
    print(format_report(report))
    plot = os.path.join(out_dir, "prediction.png")
    plot_prediction(report, fit, plot)
    for held in report["holdout"]:
        print(f"\nlargest rung ({held['x']:,.0f} params): predicted {held['predicted']:.4f}, actual {held['actual']:.4f} "
              f"({held['rel_error'] * 100:+.2f}%)")
    print(f"prediction at {report['prediction']['x']:,.0f} params ({target_mult:g}×): {report['prediction']['loss']:.4f}")
    print(f"plot: {plot}")
    return report


def muscaling(data: SampleData, out_dir: str, parallel: int = 2) -> dict:
    """Sweep at the proxy width → ladder with the transferred η → fit and predict (resumable)."""
    sweep_proxy(data, out_dir, parallel)
    results = run_ladder(data, out_dir, os.path.join(out_dir, "sweep", "best.yaml"), parallel)
    return predict_largest(results, out_dir)


@console_script
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="demo directory (runs, plots)")
    parser.add_argument("--data-dir", default="data", help="tokenizer and preprocessed sample corpus")
    parser.add_argument("--documents", type=int, default=600, help="sample-corpus files to use")
    parser.add_argument("--parallel", type=int, default=2, help="training runs at a time in the μScaling stages")
    args = parser.parse_args(argv)
    data = prepare_sample_data(args.data_dir, documents=args.documents)
    banner("decoded samples from the memmapped dataset")
    show_samples(data)
    muscaling(data, os.path.join(args.out, "muscaling"), args.parallel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
