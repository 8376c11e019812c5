"""μTransfer check: final loss vs log2(η) at widths 64..512, under μP and under SP, on the sample corpus.

    python benchmarks/bench_mutransfer.py [--out runs/bench/mutransfer] [--steps 300] [--parallel 2]
        [--widths 32,64,128,256] [--log2-lrs=-10,...,-5] [--report-only] [--figures DIR] [--arch bert|t5]
        [--demo-recipe [--demo-steps N]]

Model: the shipped mup_proxy config (llama, 2 layers, head dim 16, seq 64, batch 16, base width 64) on
the first 600 sample-corpus files with a 1024-piece tokenizer. μP: mup.base_hidden_size stays 64;
SP: mup.enabled=false. At width 64 (m = 1) μP and SP are the same model with the same updates (a
tested invariant), so SP reuses the μP runs there. Writes the two PNGs to benchmarks/figures/ (or
--figures) and prints the Markdown table for BENCHMARKS.md. Re-running resumes: finished runs are kept;
--report-only tabulates what has finished (e.g. a wide width run at fewer η) without launching.
`--arch bert` runs the same proxy as an encoder (masked-LM loss; figures mutransfer_bert_{mup,sp}.png),
`--arch t5` as an encoder-decoder (span-corruption loss). `--demo-recipe` trains every run on make demo's
budget (σ-initialised readout, 200 × 32 sequences, η annealed to 0), which leaves the unigram plateau.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

from megamu.demo import DEMO_OVERRIDES, prepare_sample_data
from megamu.scaling.launch import (
    FINAL_STATUSES,
    MetricRule,
    RunResult,
    adopt_finished_run,
    previous_result,
    read_status,
)
from megamu.scaling.sweep import SweepPlan, best_result, run_sweep
from megamu.scaling.sweep_plot import best_curves, plot_loss_vs_value
from megamu.shipped import shipped_path

PROXY_CONFIG = shipped_path("mup_proxy")
FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")  # beside this script, in the checkout
BASE_WIDTH = 64
WIDTHS = [32, 64, 128, 256]
LOG2_LRS = [-10, -9, -8, -7, -6, -5]
ARCHS = ("llama", "bert", "t5")
# Every run sees the same batches in the same order. Default score: the validation loss at the end
# (train.eval_iters batches held out, the same for every run); `--metric train` scores the mean train
# loss of the last 10 records instead.


def bench_data(data_dir: str = "runs/bench/data") -> list[str]:
    """Overrides pointing the proxy config at the benchmark corpus (built once, then reused)."""
    data = prepare_sample_data(data_dir, documents=600, vocab_size=1024)
    return [f"data.path={data.data_prefix}", f"data.tokenizer_model={data.tokenizer_model}"]


def budget_overrides(demo_recipe: bool, steps: int, batch: int, demo_steps: Optional[int] = None) -> list[str]:
    """Every run's budget: make demo's (which leaves the unigram plateau; `demo_steps` steps instead of its 200
    when given), or `steps` × `batch` sequences."""
    if demo_recipe:
        return [*DEMO_OVERRIDES, *([f"train.max_steps={demo_steps}"] if demo_steps else [])]
    return [f"train.max_steps={steps}", f"train.global_batch_size={batch}", f"train.micro_batch_size={batch}"]


def arch_overrides(arch: str) -> list[str]:
    """The proxy as `arch`; none for the decoder, whose runs keep their overrides (and so their finished runs)."""
    return [] if arch == "llama" else [f"model.arch={arch}"]


def lr_values(log2s: list[float]) -> list[float]:
    return [2.0 ** v for v in log2s]


def adopt_shared_runs(mup_dir: str, sp_plan: SweepPlan) -> None:
    """Seed the SP sweep with the finished μP runs at m = 1, where both are the same model (same updates)."""
    for spec in sp_plan.specs():
        source = os.path.join(mup_dir, spec.name)
        finished = (read_status(source) or {}).get("status") in FINAL_STATUSES
        if spec.labels["width"] == BASE_WIDTH and finished and not os.path.exists(spec.run_dir):
            adopt_finished_run(source, spec)


def finished_results(plan: SweepPlan, rule: MetricRule) -> list[RunResult]:
    """The plan's runs that already ended (done or diverged), launching nothing; the rest are left out."""
    return [r for r in (previous_result(spec, rule) for spec in plan.specs()) if r is not None]


def best_log2(results: list[RunResult], width: int) -> Optional[float]:
    best = best_result(results, width)
    return None if best is None else math.log2(best.labels["hps"]["train.lr"])


def markdown(name: str, results: list[RunResult], log2s: list[float], widths: list[int], score: str) -> list[str]:
    curves = best_curves(results, "train.lr")
    lines = [f"**{name}** — {score}; best per width in bold, `div` = diverged",
             "", "| width | " + " | ".join(f"η=2^{v:g}" for v in log2s) + " | best log2 η |",
             "| --- |" + " --- |" * (len(log2s) + 1)]
    for width in widths:
        curve = curves.get(width, {})
        best = best_log2(results, width)
        cells = []
        for v in log2s:
            loss = curve.get(2.0 ** v, "missing")
            text = "div" if loss is None else "n/a" if loss == "missing" else f"{loss:.4f}"
            cells.append(f"**{text}**" if best is not None and v == best else text)
        lines.append(f"| {width} | " + " | ".join(cells) + f" | {'n/a' if best is None else f'{best:g}'} |")
    return lines


def verdict(mup: list[RunResult], sp: list[RunResult], widths: list[int], step: float) -> list[str]:
    """How far each width's best η lies from the proxy's (in grid steps), and whether wider is better."""
    def summary(label: str, results: list[RunResult]) -> str:
        bests = {w: best_log2(results, w) for w in widths}
        proxy = bests[widths[0]]
        found = [b for b in bests.values() if b is not None]
        off = max(abs(b - proxy) for b in found) / step if found and proxy is not None else math.nan
        spread = (max(found) - min(found)) / step if found else math.nan
        losses = [best_result(results, w) for w in widths]
        monotone = all(a is not None and b is not None and b.value <= a.value for a, b in zip(losses, losses[1:]))
        return (f"- {label}: best log2 η per width {', '.join('n/a' if b is None else f'{b:g}' for b in bests.values())}"
                f" — at most {off:g} grid step(s) from the width-{widths[0]} proxy's best "
                f"({'within one step' if off <= 1 else 'more than one step'}), spread {spread:g} step(s); "
                f"best loss per width {', '.join(f'{r.value:.4f}' if r else 'n/a' for r in losses)} "
                f"({'never worse when wider' if monotone else 'NOT monotone in width'}).")

    return [summary("μP", mup), summary("SP", sp)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/mutransfer")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16, help="global (= micro) batch in sequences of 64 tokens")
    parser.add_argument("--metric", choices=("train", "val"), default="val")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--log2-lrs", default=",".join(map(str, LOG2_LRS)))
    parser.add_argument("--report-only", action="store_true",
                        help="launch nothing: tabulate and plot the runs that finished (n/a for the others)")
    parser.add_argument("--figures", default=FIGURES, help="where the PNGs go (default: %(default)s)")
    parser.add_argument("--arch", default="llama", choices=ARCHS, help="model.arch of the proxy")
    parser.add_argument("--demo-recipe", action="store_true",
                        help="every run on make demo's budget (megamu.demo.DEMO_OVERRIDES); --steps, --batch unused")
    parser.add_argument("--demo-steps", type=int, help="with --demo-recipe: this many steps instead of its 200")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    log2s = [float(v) for v in args.log2_lrs.split(",")]
    rule = MetricRule(metric=args.metric, smooth=10)
    overrides = [*bench_data(), *budget_overrides(args.demo_recipe, args.steps, args.batch, args.demo_steps),
                 *arch_overrides(args.arch)]
    figure_prefix = "mutransfer" if args.arch == "llama" else f"mutransfer_{args.arch}"
    points = [{"train.lr": lr} for lr in lr_values(log2s)]
    start = time.time()
    mup_dir, sp_dir = os.path.join(args.out, "mup"), os.path.join(args.out, "sp")
    mup_plan = SweepPlan(PROXY_CONFIG, overrides, points, widths, mup_dir)
    sp_plan = SweepPlan(PROXY_CONFIG, [*overrides, "mup.enabled=false"], points, widths, sp_dir)
    if args.report_only:
        mup, sp = finished_results(mup_plan, rule), finished_results(sp_plan, rule)
    else:
        mup, _ = run_sweep(mup_plan, rule, args.parallel)
        adopt_shared_runs(mup_dir, sp_plan)
        sp, _ = run_sweep(sp_plan, rule, args.parallel)
    score = "final validation loss" if rule.metric == "val" else "mean train loss of the last 10 records"
    os.makedirs(args.figures, exist_ok=True)
    budget = (f"demo recipe, {args.demo_steps or 200} steps" if args.demo_recipe else
              f"{args.steps} steps × {args.batch} sequences")
    for name, results in (("mup", mup), ("sp", sp)):
        label = "μP" if name == "mup" else "SP"
        plot_loss_vs_value(results, os.path.join(args.figures, f"{figure_prefix}_{name}.png"), rule.metric,
                           title=f"{label} {args.arch}: {score} vs log2(η), {budget}")
    step = min(b - a for a, b in zip(sorted(log2s), sorted(log2s)[1:]))
    lines = [*markdown("μP", mup, log2s, widths, score), "", *markdown("SP", sp, log2s, widths, score), "",
             *verdict(mup, sp, widths, step), "", f"Wall time: {(time.time() - start) / 60:.1f} min."]
    print("\n".join(lines))
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump({"mup": [r.to_dict() for r in mup], "sp": [r.to_dict() for r in sp]}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
