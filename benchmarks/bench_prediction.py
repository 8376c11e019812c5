"""Loss-prediction accuracy: fit a μP width ladder, predict a width with ≥4× the params, compare.

    python benchmarks/bench_prediction.py [--out runs/bench/prediction] [--steps 100] [--batch 8]
        [--log2-lrs=-10,-9,-8,-7,-6,-5] [--fit-widths 32,48,64,96,128,192] [--target-width 512] [--parallel 2]
        [--figures DIR] [--demo-recipe] [--ladders mup,sp] [--arch llama|bert|t5]
        [--demo-steps N]

Same model and corpus as bench_mutransfer.py. η is the best learning rate of a width-64 proxy
sweep under the ladder's own budget, transferred unchanged. The ladder trains the fitted widths
and the target width (held out: ≥4× the params of the largest fitted rung); L = a·params^b + c
is fitted on the final validation losses (the same held-out batches for every rung, as in the
μTransfer benchmark) and the held-out rung's predicted loss and 90%
interval are compared with what it reached. The same ladder under SP (mup.enabled=false, the
same η) is the contrast. A rung whose resolved config equals a finished run of the μTransfer
sweep (or of an earlier run of this benchmark, --reuse) is adopted instead of being trained again
(identical runs). --seeds trains every rung once per seed and fits them all. A ladder whose losses do
not fall with params is reported as such (no fit), not as a crash.

--demo-recipe trains every run (sweep and ladder) on `make demo`'s budget (megamu.demo.DEMO_OVERRIDES:
σ-initialised readout, 50-step warm-up, MLP 8/3 of every width, η annealed to 0, 200 × 32 sequences,
44 eval batches), which leaves the unigram plateau; --steps and --batch are then
unused. Besides the classic fit, the cross-validated forecast (the report's `selection`) is scored, and
the CPU time of the training processes is reported.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from typing import Optional

# Run as a script, so this directory is on sys.path.
from bench_mutransfer import (ARCHS, BASE_WIDTH, FIGURES, LOG2_LRS, PROXY_CONFIG, arch_overrides, bench_data,
                              budget_overrides, lr_values)

from megamu.config import fill_mask_token_id, fill_vocab_size, load_config
from megamu.errors import FitError
from megamu.scaling.ladder import TokenBudget, plan_ladder, predict_ladder
from megamu.scaling.launch import MetricRule, RunSpec, adopt_finished_run, read_status, run_all
from megamu.scaling.plot import plot_prediction
from megamu.scaling.predict import format_report
from megamu.scaling.seeds import holdout_by_size
from megamu.scaling.sweep import SweepPlan, run_sweep

# Score: the final validation loss (the same held-out batches for every run), as in bench_mutransfer.
RULE = MetricRule(metric="val", smooth=10)
FIT_WIDTHS = [32, 48, 64, 96, 128, 192]
TARGET_WIDTH = 512


def proxy_lr(overrides: list[str], log2s: list[float], out: str, parallel: int, candidates: list[str]) -> float:
    """The best η of a sweep at the proxy width under the ladder's own token budget (identical finished runs
    among `candidates`, e.g. the μTransfer sweep's width-64 runs, adopted rather than trained again)."""
    points = [{"train.lr": lr} for lr in lr_values(log2s)]
    plan = SweepPlan(PROXY_CONFIG, overrides, points, [BASE_WIDTH], os.path.join(out, "proxy"))
    reused = reuse_identical_runs(plan.specs(), candidates)
    if reused:
        print(f"proxy sweep: reused identical runs {', '.join(reused)}")
    _, summary = run_sweep(plan, RULE, parallel)
    if summary["best"] is None:
        raise SystemExit(f"no proxy run finished; see {os.path.join(out, 'proxy')}")
    return summary["best"]["hps"]["train.lr"]


def _resolved(config: str, overrides: list[str]) -> dict:
    """The run's full config, its directory and resume flag left out, the tokenizer named by its content."""
    cfg = load_config(config, overrides)
    fill_vocab_size(cfg)
    fill_mask_token_id(cfg)  # as the trainer's resolve does for bert, so a saved config compares equal
    cfg = cfg.to_dict()
    cfg["train"].pop("out_dir")
    cfg["train"].pop("resume")
    with open(cfg["data"]["tokenizer_model"], "rb") as handle:
        cfg["data"]["tokenizer_model"] = hashlib.sha256(handle.read()).hexdigest()
    return cfg


def finished_runs(directory: str) -> list[str]:
    """Run directories directly under `directory` that finished (their status file says so)."""
    if not os.path.isdir(directory):
        return []
    runs = [os.path.join(directory, name) for name in sorted(os.listdir(directory))]
    return [run for run in runs if (read_status(run) or {}).get("status") == "done"]


def reuse_identical_runs(specs: list[RunSpec], candidates: list[str]) -> list[str]:
    """Adopt finished runs whose saved config equals a rung's (same model, data, seed and schedule);
    returns the rungs reused."""
    resolved = {run: _resolved(os.path.join(run, "config.yaml"), []) for run in candidates}
    reused = []
    for spec in specs:
        if os.path.exists(spec.run_dir):
            continue
        wanted = _resolved(PROXY_CONFIG, spec.overrides)
        source = next((run for run, cfg in resolved.items() if cfg == wanted), None)
        if source is not None:
            adopt_finished_run(source, spec)
            reused.append(f"{spec.name} ({source})")
    return reused


def ladder(name: str, overrides: list[str], lr: float, args: argparse.Namespace) -> dict:
    specs = plan_ladder(PROXY_CONFIG, [*overrides, f"train.lr={lr}"], [*args.fit_widths, args.target_width],
                        TokenBudget(steps=None if args.demo_recipe else args.steps), os.path.join(args.out, name),
                        args.seeds)
    candidates = [run for d in [args.mutransfer, *args.reuse] for run in finished_runs(os.path.join(d, name))]
    reused = reuse_identical_runs(specs, candidates)
    results = run_all(specs, RULE, args.parallel)
    label = "μP" if name == "mup" else "SP"
    print(f"\n===== {label} ladder (η = {lr:g}; reused identical runs: {', '.join(reused) or 'none'}) =====")
    losses = {r.name: r.value for r in results}
    print("final losses: " + ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a" for k, v in losses.items()))
    try:
        report, fit, dropped = predict_ladder(results, holdout=1, metric=RULE.metric, smooth=RULE.smooth,
                                              seed_offsets=len(args.seeds) > 1)
    except FitError as exc:  # a ladder the power law cannot describe is a result, not a crash
        print(f"no fit: {exc}")
        report = {"error": str(exc), "losses": losses, "params": {r.name: r.labels["params"] for r in results}}
        with open(os.path.join(args.out, f"{name}.json"), "w") as handle:
            json.dump(report, handle, indent=1)
        return report
    for note in dropped:
        print(f"left out of the fit: {note}")
    print(format_report(report))
    budget = (f"demo{args.demo_steps or ''}" if args.demo_recipe else f"{args.steps}steps")
    arch = "" if args.arch == "llama" else f"{args.arch}_"
    plot_prediction(report, fit, os.path.join(args.figures, f"prediction_{arch}{name}_{budget}.png"))
    with open(os.path.join(args.out, f"{name}.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    return report


def row(label: str, report: dict) -> str:
    if "error" in report:
        losses = ", ".join(f"{k} {v:.3f}" for k, v in report["losses"].items() if v is not None)
        return f"| {label} | – | – | – | – | – | no fit: {report['error'].split(':')[0]} | {losses} |"
    fitted = [p for p in report["points"] if p["used"]]
    held = report["holdout"]
    if not held:
        return f"| {label} | {len(fitted)} | – | – | – | – | held-out rung did not finish |"
    # Several seeds of the held-out width (seed offsets): score their mean against the seed-averaged law.
    (scored,) = report.get("holdout_mean") or held
    lo, hi = scored["interval"] or (float("nan"), float("nan"))
    ratio = scored["x"] / max(p["x"] for p in fitted)
    runs = f"mean of {scored['runs']} seeds " if "runs" in scored else ""
    inside = "yes" if lo <= scored["actual"] <= hi else "no"
    fit = report["fit"]
    return (f"| {label} | {len(fitted)} | {scored['x']:,.0f} ({ratio:.1f}×) | {runs}{scored['actual']:.4f} | "
            f"{scored['predicted']:.4f} | {scored['rel_error'] * 100:+.2f}% | [{lo:.4f}, {hi:.4f}] {inside} | "
            f"{fit['a']:.3g}·N^{fit['b']:.3f} + {fit['c']:.3f} |")


def selection_row(label: str, report: dict) -> str:
    """The cross-validated forecast of the held-out width (its seeds' mean), as the demo scores it."""
    selection = report.get("selection") or {"error": "no fit"}
    if "error" in selection:
        return f"| {label} | no cross-validated forecast: {selection['error']} | – | – | – |"
    scored = holdout_by_size(selection["holdout"])
    if not scored:
        return f"| {label} | {selection['chosen']} | held-out rung did not finish | – | – |"
    held = scored[-1]
    lo, hi = held["interval"] or (float("nan"), float("nan"))
    inside = "yes" if lo <= held["actual"] <= hi else "no"
    return (f"| {label} | {selection['chosen']} ({selection['reason']}) | {held['predicted']:.4f} vs "
            f"{held['actual']:.4f} | {held['rel_error'] * 100:+.2f}% | [{lo:.4f}, {hi:.4f}] {inside} |")


def cpu_minutes() -> float:
    """CPU time (user + system) of this process and the training runs it waited for."""
    own, runs = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + runs.ru_utime + runs.ru_stime) / 60


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/prediction")
    parser.add_argument("--mutransfer", default="runs/bench/mutransfer",
                        help="bench_mutransfer.py's --out: identical finished runs there are reused")
    parser.add_argument("--reuse", nargs="*", default=[], metavar="DIR",
                        help="earlier bench_prediction.py --out directories: identical finished rungs there are reused")
    parser.add_argument("--seeds", default="", help="comma-separated train.seed values: every rung once per seed")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8, help="global (= micro) batch size in sequences of 64 tokens")
    parser.add_argument("--log2-lrs", default=",".join(map(str, LOG2_LRS)), help="proxy sweep grid (log2 η)")
    parser.add_argument("--fit-widths", default=",".join(map(str, FIT_WIDTHS)))
    parser.add_argument("--target-width", type=int, default=TARGET_WIDTH)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--figures", default=FIGURES, help="where the PNGs go (default: %(default)s)")
    parser.add_argument("--demo-recipe", action="store_true",
                        help="make demo's budget and settings for every run (--steps, --batch unused)")
    parser.add_argument("--demo-steps", type=int, help="with --demo-recipe: this many steps instead of its 200")
    parser.add_argument("--arch", default="llama", choices=ARCHS, help="model.arch of the proxy and its ladder")
    parser.add_argument("--ladders", default="mup,sp", help="which ladders to train: mup, sp or both")
    args = parser.parse_args(argv)
    args.fit_widths = [int(w) for w in args.fit_widths.split(",")]
    args.seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    args.ladders = [name.strip() for name in args.ladders.split(",") if name.strip()]
    if not args.ladders or set(args.ladders) - {"mup", "sp"}:
        parser.error(f"--ladders takes mup, sp or mup,sp, got {','.join(args.ladders) or 'nothing'}")
    start = time.time()
    overrides = [*bench_data(), *budget_overrides(args.demo_recipe, args.steps, args.batch, args.demo_steps),
                 *arch_overrides(args.arch)]
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.figures, exist_ok=True)
    candidates = [run for d in [args.mutransfer, *args.reuse] for run in finished_runs(os.path.join(d, "mup"))]
    lr = proxy_lr(overrides, [float(v) for v in args.log2_lrs.split(",")], args.out, args.parallel, candidates)
    ladders = {"mup": ("μP", []), "sp": ("SP", ["mup.enabled=false"])}
    reports = {name: ladder(name, [*overrides, *extra], lr, args) for name, (_, extra) in ladders.items()
               if name in args.ladders}
    budget = f"make demo's budget (DEMO_OVERRIDES), {args.demo_steps or 200} steps" if args.demo_recipe else \
        f"{args.steps} steps × {args.batch * 64} tokens"
    lines = ["| parametrization | runs fitted | held-out params (× largest fitted) | actual loss | predicted | "
             "rel. error | 90% interval, contains actual | fit |", "| --- | --- | --- | --- | --- | --- | --- | --- |",
             *[row(ladders[name][0], report) for name, report in reports.items()], "",
             "| parametrization | cross-validated form (why) | predicted vs actual | rel. error | 90% interval, "
             "contains actual |", "| --- | --- | --- | --- | --- |",
             *[selection_row(ladders[name][0], report) for name, report in reports.items()], "",
             f"η = {lr:g} (best of the width-64 proxy sweep), {budget}; "
             f"wall time {(time.time() - start) / 60:.1f} min, CPU time {cpu_minutes():.1f} min."]
    print("\n" + "\n".join(lines))
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
