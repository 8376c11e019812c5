"""benchmarks/bench_mfu.py end to end at a tiny size: every field of its report is there and sane."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## MFU and step split (issue 11)"
TINY = ["--shapes", "tiny", "--steps", "2", "--rounds", "1", "--warmup", "1", "--vocab", "512",
        "model.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=4"]  # 2 micro batches a step
IMPLEMENTATIONS = ("megamu engine (ZeRO 0)", "plain loop", "HF Llama")


def number(cell: str) -> float:
    """The first number in a table cell ("1,234", "12.5 (40%)", "33.7%")."""
    return float(re.match(r"-?[\d,.]+", cell.strip()).group().replace(",", ""))


def table(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows, as {column: cell}, of the first markdown table whose header starts with `first_header`;
    asserts they are one row per implementation, in order."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    assert [row["implementation"] for row in rows] == list(IMPLEMENTATIONS), rows
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> str:
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Another section\n\nkept\n")
    result = subprocess.run([sys.executable, "benchmarks/bench_mfu.py", *TINY, "--append", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert "## Another section\n\nkept\n" in text
    assert text.count(SECTION) == 1
    return text[text.index(SECTION):]


def test_header_names_the_run(report):
    header = report.splitlines()[2]
    assert re.match(r"\d{4}-\d\d-\d\d, .+, torch \d", header), header
    assert ", fp32, config tiny, fused CE on, compile off;" in header
    assert re.search(r"load average \d+\.\d at the start, \d+\.\d at the end", header), header
    peak = re.search(r"Peak ([\d.e+]+) TFLOP/s \(measured, fp32 square matmul on the cpu, best of \d+ readings\)",
                     header)
    assert peak and float(peak.group(1)) > 0, header
    assert "Reproduce: `python benchmarks/bench_mfu.py --shapes tiny" in header


def test_throughput_mfu_and_memory_are_sane(report):
    peak = float(re.search(r"Peak ([\d.e+]+) TFLOP/s", report).group(1))
    for row in table(report, "shape"):
        tokens_per_s, step_ms = number(row["tokens/s"]), number(row["step ms"])
        assert row["tokens/step"] == "128", row  # 4 sequences of 32 tokens
        assert tokens_per_s > 0 and step_ms > 0, row
        assert tokens_per_s * step_ms / 1e3 == pytest.approx(128, rel=0.02), row
        tflops, mfu = number(row["TFLOP/s"]), number(row["MFU"]) / 100
        assert 0 < mfu <= 1, row
        assert tflops / peak == pytest.approx(mfu, rel=0.05, abs=1e-3), row
        total, state, step = map(float, re.fullmatch(r"([\d,]+) \(([\d,]+) \+ ([\d,]+)\)",
                                                      row["memory MiB (state + step)"]).groups())
        assert state > 0 and step > 0 and abs(total - state - step) <= 1, row


def test_step_split_adds_up(report):
    for row in table(report, "shape | implementation | step ms"):
        step = number(row["step ms"])
        phases = {p: number(row[p]) for p in ("data", "forward", "backward", "optimizer")}
        assert all(v >= 0 for v in phases.values()) and min(phases["forward"], phases["backward"],
                                                            phases["optimizer"]) > 0, row
        # The phases are disjoint parts of the step: they cover most of it and never more.
        assert 0.5 * step <= sum(phases.values()) <= step + 0.5, row
        assert number(row["other"]) == pytest.approx(step - sum(phases.values()), abs=0.5), row


def test_profile_shares_cover_the_step(report):
    for row in table(report, "shape | implementation | matmul"):
        shares = [number(row[c]) for c in ("matmul", "attention", "other ops", "outside ops")]
        assert shares[0] > 0 and all(0 <= s <= 100 for s in shares), row
        assert sum(shares) == pytest.approx(100, abs=2), row
        assert re.fullmatch(r"(\S+ \d+%, ){2}\S+ \d+%", row["largest other ops"]), row


def test_ratios_against_the_goals(report):
    assert re.search(r"- tiny: megamu engine / plain loop tokens/s \d+\.\d\dx \(goal >= 1\)", report)
    assert re.search(r"- tiny: megamu engine / HF Llama tokens/s \d+\.\d\dx \(goal >= 1\.1\)", report)
