"""Console scripts and packaging: every script answers --help from the environment's bin directory, a
user error is one `error:` line with exit code 2, tools/*.py still run from a checkout, and a
non-editable build ships the configs and the cli modules."""
from __future__ import annotations

import glob
import os
import runpy
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata

import pytest

from scripts import script
from test_smoke_run import SMALL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(os.path.basename(p)[:-len(".yaml")] for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")))
SCRIPTS = ["megamu-train", "megamu-preprocess", "megamu-train-tokenizer", "megamu-predict", "megamu-sweep",
           "megamu-scale", "megamu-coord-check", "megamu-merge", "megamu-demo", "megamu-export-hf", "megamu-generate",
           "megamu-eval", "megamu-import-hf", "megamu-plan", "megamu-curve"]


def user_error(name: str, tmp: str) -> list[str]:
    """A command line with one mistake a user could make, for console script `name`."""
    missing = os.path.join(tmp, "missing")
    return {
        "megamu-train": ["--config", "no_such_config"],
        "megamu-preprocess": ["--input", missing + ".jsonl", "--output-prefix", missing, "--tokenizer-model",
                              missing + ".model"],
        "megamu-train-tokenizer": ["--input", missing + ".jsonl", "--vocab-size", "300", "--model-prefix", missing],
        "megamu-predict": ["--points", missing + ".csv"],
        "megamu-sweep": ["--config", "no_such_config", "--out", missing, "--grid", "train.lr=1e-3"],
        "megamu-scale": ["--config", "no_such_config", "--widths", "64", "--out", missing],
        "megamu-coord-check": ["--config", "no_such_config", "--json", missing + ".json"],
        "megamu-merge": [missing, "--output", missing + ".pt"],
        "megamu-demo": ["--documents", "many"],
        "megamu-export-hf": [missing, missing + "_hf"],
        "megamu-generate": [missing, "--prompt", "hi"],
        "megamu-eval": [missing],
        "megamu-import-hf": [missing, "--config", "tiny", "--out", missing + "_run"],
        "megamu-plan": ["--flops", "1e21", "--points", missing + ".csv"],
        "megamu-curve": [missing + "_a", missing + "_b"],
    }[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """(name, "help" | "error") -> finished process; all started at once, since each import takes seconds."""
    tmp = str(tmp_path_factory.mktemp("cli"))
    argvs = {(name, "help"): ["--help"] for name in SCRIPTS}
    argvs.update({(name, "error"): user_error(name, tmp) for name in SCRIPTS})
    procs = {key: subprocess.Popen([script(key[0]), *argv], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for key, argv in argvs.items()}
    return {key: (proc, *proc.communicate(timeout=300)) for key, proc in procs.items()}


def test_setup_declares_exactly_these_console_scripts():
    declared = {ep.name for ep in metadata.distribution("megamu").entry_points if ep.group == "console_scripts"}
    assert declared == set(SCRIPTS), "re-run `pip install -e .` after changing setup.py"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(runs, name):
    proc, out, err = runs[(name, "help")]
    assert proc.returncode == 0, err
    assert out.startswith(f"usage: {name}")


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_user_error_is_one_line_and_exit_code_2(runs, name):
    proc, _, err = runs[(name, "error")]
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error" in line.lower()]
    assert line.startswith("error: ")
    if "no_such_config" in user_error(name, ""):  # an unknown --config name lists the shipped ones
        assert f"shipped: {', '.join(SHIPPED)}" in line


@pytest.mark.parametrize("problem", ["corrupt stats", "empty split", "truncated bin", "bad magic"])
def test_train_reports_a_data_problem_as_one_error_line(problem, tmp_path, tiny_tokenizer, tiny_dataset_prefix):
    """Data that passes the config checks but not training's: exit 2, one `error:` line naming it and the fix,
    no traceback."""
    prefix = str(tmp_path / "copy_text_document")
    for suffix in (".bin", ".idx"):
        shutil.copy(tiny_dataset_prefix + suffix, prefix + suffix)
    overrides, named = [], "copy_text_document.stats.json"
    if problem == "corrupt stats":
        (tmp_path / "copy_text_document.stats.json").write_text('{"tokens": 12')  # cut short
    elif problem == "truncated bin":
        with open(prefix + ".bin", "r+b") as handle:
            handle.truncate(os.path.getsize(prefix + ".bin") - 2)
        named = "copy_text_document.bin: "
    elif problem == "bad magic":
        with open(prefix + ".idx", "r+b") as handle:
            handle.write(b"NOTANIDX")
        named = "copy_text_document.idx: bad magic"
    else:
        overrides, named = ["data.split=0,1,0"], "'train' split no documents of"
    proc = subprocess.run([script("megamu-train"), "--config", "tiny", *SMALL, f"data.path={prefix}",
                           f"data.tokenizer_model={tiny_tokenizer.model_path}", f"train.out_dir={tmp_path / 'run'}",
                           "train.max_steps=1", *overrides],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert named in line
    if problem in ("truncated bin", "bad magic"):
        assert "megamu-preprocess" in line  # the fix


def test_a_reader_that_stops_early_ends_the_tool_quietly(tmp_path):
    """`megamu-... | head -1`: a console script whose reader closed the pipe stops without a traceback."""
    program = ("import sys\nfrom megamu.cli import console_script\n"
               "@console_script\ndef main(argv=None):\n    for _ in range(100_000):\n        print('x' * 100)\n"
               "    return 0\nsys.exit(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", program], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"x" * 100 + b"\n"
    proc.stdout.close()  # 10 MB more to write: far beyond any pipe buffer
    assert proc.stderr.read() == b"" and proc.wait(timeout=60) == 1


def test_an_output_in_a_missing_directory_is_refused_before_any_work(tmp_path, capsys):
    from megamu.cli import plan as plan_tool
    out = tmp_path / "missing" / "plan.json"
    assert plan_tool.main(["--flops", "1e21", "--json", str(out), "--", "model.vocab_size=32000"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: output directory {out.parent} does not exist (--json {out}); create it first\n"


@pytest.mark.parametrize("tool", sorted(glob.glob(os.path.join(REPO, "tools", "*.py"))))
def test_checkout_tools_run_the_console_scripts(tool, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [tool, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(tool, run_name="__main__")
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage:")


def test_wheel_ships_configs_and_cli_and_resolves_configs_by_name(tmp_path):
    source = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info in it
    for part in ("megamu", "configs", "ds_configs"):
        shutil.copytree(os.path.join(REPO, part), source / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, "setup.py"), source)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("megamu-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert {f"megamu/configs/{name}.yaml" for name in SHIPPED} <= names
    assert {f"megamu/ds_configs/zero{stage}.json" for stage in range(4)} <= names
    assert {f"megamu/cli/{os.path.basename(p)}" for p in glob.glob(os.path.join(REPO, "megamu", "cli", "*.py"))} <= names

    # From another directory, with the unpacked wheel first on the path: the package, its configs and
    # every entry point come from the wheel, not from the checkout.
    probe = """
import sys
from importlib import metadata
import megamu
from megamu.config import load_config
from megamu.shipped import DEEPSPEED, resolve_config
site = sys.argv[1]
assert megamu.__file__.startswith(site), megamu.__file__
for name in ("tiny", "llama_125m"):
    assert resolve_config(name).startswith(site)
    load_config(resolve_config(name))
assert resolve_config("zero2", DEEPSPEED).startswith(site)
for ep in metadata.distribution("megamu").entry_points:
    assert sys.modules[ep.load().__module__].__file__.startswith(site), ep
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "site")], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, timeout=120)
    assert run.stdout.strip() == "ok", run.stderr
