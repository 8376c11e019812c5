"""`make bench`: every benchmarks/bench_*.py in turn at its smallest sensible size, as a smoke test.

    python benchmarks/run_all.py

The sizes below are for checking that each benchmark runs end to end, not for figures: nothing is
written into BENCHMARKS.md or benchmarks/figures/, and runs go to runs/bench-smoke/ (the μTransfer
and prediction benchmarks share the sample corpus they build in runs/bench/data with full runs).
A bench_*.py missing from SMOKE runs with its defaults. Prints which benchmarks succeeded; exits 1
if any failed.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)
OUT = os.path.join("runs", "bench-smoke")
FIGURES = os.path.join(OUT, "figures")
# Per benchmark, the command lines to run (a benchmark with two modes runs twice).
SMOKE = {
    "bench_preprocess.py": [["--documents", "20", "--copies", "2", "--vocab-size", "1024", "--seq-len", "128",
                             "--batch", "2", "--no-write"]],
    "bench_mfu.py": [["--shapes", "tiny", "--steps", "1", "--rounds", "1", "--warmup", "1", "--vocab", "512"]],
    "bench_tp.py": [[*mode, "--shapes", "small", "--steps", "1", "--rounds", "1", "--warmup", "1",
                     "--micro-batch", "1", "--vocab", "512"] for mode in ([], ["--tp1-overhead"])],
    "bench_pipeline.py": [["--micro-batches", "2", "--steps", "4", "--hidden", "64", "--layers", "2", "--seq-len", "32"]],
    "bench_zero_memory.py": [["--smoke"]],
    "bench_forecast.py": [["--only", "gadre2024_refinedweb"]],  # two splits: seconds, not the suite's minutes
    "bench_curve.py": [["--quick", "--out", os.path.join(OUT, "curve")]],
    "bench_generate.py": [["--seq-len", "48", "--rounds", "1"]],
    "bench_activation_checkpointing.py": [["--shape", "small", "--steps", "1", "--rounds", "1", "--vocab", "512"]],
    "bench_mutransfer.py": [["--out", os.path.join(OUT, "mutransfer"), "--figures", FIGURES, "--widths", "32,64",
                             "--log2-lrs=-9,-8", "--steps", "2", "--batch", "2"]],  # two η: the table needs a step
    # Reuses the μTransfer smoke's identical width-64 run.
    "bench_prediction.py": [["--out", os.path.join(OUT, "prediction"), "--mutransfer", os.path.join(OUT, "mutransfer"),
                             "--figures", FIGURES, "--fit-widths", "32,48,64", "--target-width", "96",
                             "--log2-lrs=-8", "--steps", "2", "--batch", "2"]],
}


def commands() -> list[list[str]]:
    """`python bench_X.py ARGS...` for every benchmark file, in name order."""
    found = []
    for path in sorted(glob.glob(os.path.join(BENCHMARKS, "bench_*.py"))):
        for args in SMOKE.get(os.path.basename(path), [[]]):
            found.append([sys.executable, os.path.relpath(path, REPO), *args])
    return found


def main() -> int:
    results = []
    for cmd in commands():
        print(f"\n===== {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd, cwd=REPO).returncode  # output streams to the console as it comes
        results.append((" ".join(cmd[1:]), code, time.perf_counter() - start))
    print("\n===== summary")
    for name, code, seconds in results:
        print(f"{'ok' if code == 0 else f'FAILED (exit {code})':16s} {seconds:6.0f}s  {name}")
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
