"""megamu's console scripts (setup.py's entry points): each parses its arguments, calls megamu, prints.

Every script's `main` is wrapped by `console_script`, so a user error (a MegamuError, a missing file,
an argument argparse refuses) is one `error: ...` line on stderr and exit code 2, with no traceback;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from typing import Callable, NoReturn, Optional, Sequence

from megamu.errors import EXIT_USER_ERROR, MegamuError, MegamuWarning
from megamu.fileio import check_output_directory

Main = Callable[[Optional[Sequence[str]]], int]


class UsageError(MegamuError):
    """A command line that argparse refused."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals are UsageErrors, so they print like every other user error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def console_script(main: Main) -> Main:
    """Decorate a `main(argv) -> exit code`: a MegamuError or FileNotFoundError becomes one `error:` line and
    EXIT_USER_ERROR; any other exception is a bug and keeps its traceback."""
    @functools.wraps(main)
    def run(argv: Optional[Sequence[str]] = None) -> int:
        show_megamu_warnings()
        try:
            return main(argv)
        except (MegamuError, FileNotFoundError) as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, and keep Python's flush at exit from failing again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    return run


def check_outputs(args: argparse.Namespace, *options: str) -> None:
    """Refuse missing or unwritable output directories of these options (attribute names) before any work."""
    for option in options:
        path = getattr(args, option)
        if path:
            check_output_directory(path, "--" + option.replace("_", "-"))


def show_megamu_warnings() -> None:
    """Print a MegamuWarning as one `warning:` line (every time it happens); other warnings keep Python's format."""
    default = warnings.showwarning
    if getattr(default, "megamu", False):
        return

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
        if issubclass(category, MegamuWarning):
            print(f"warning: {one_line(message)}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    show.megamu = True  # type: ignore[attr-defined]
    warnings.showwarning = show
    warnings.simplefilter("always", MegamuWarning)


def one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN_DIR and --tag: which checkpoint of which run a tool reads."""
    parser.add_argument("run_dir", help="the run directory (train.out_dir) holding config.yaml and checkpoints/")
    parser.add_argument("--tag", default=None, help="checkpoint tag; default: the newest complete checkpoint")


def int_list(text: str) -> list[int]:
    """argparse type of a comma-separated list of integers (`64,128,256`)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
