"""Published scaling ladders of other trainers (../shared/ladders) and the fair split of each.

The CSVs are read in place, never copied: the directory sits beside the repository
(`<repo>/../shared/ladders`, overridable with MEGAMU_LADDERS). Each split follows the README
there: fit the small runs, hold out the large ones. `size` says what "the next size" means for
expanding-window cross-validation (params for model-size ladders, the FLOP budget for IsoFLOP grids).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

LADDERS_ENV = "MEGAMU_LADDERS"


def ladders_dir() -> Path:
    """Where the published ladders live; may not exist (tests skip, the benchmark says so)."""
    override = os.environ.get(LADDERS_ENV)
    return Path(override) if override else Path(__file__).resolve().parents[2].parent / "shared" / "ladders"


@dataclass(frozen=True)
class Ladder:
    """The rows of one split: fitted and held out, as arrays of params N, tokens D and loss."""

    name: str
    split: str
    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    fit: np.ndarray  # boolean mask of the fitted rows; the rest are held out
    size: str  # "params" or "flops": the order of expanding-window cross-validation
    two_d: bool  # N and D vary independently (False: one tokens-per-param, or one run per budget)

    @property
    def flops(self) -> np.ndarray:
        return 6.0 * self.params * self.tokens

    def x(self, kind: str) -> np.ndarray:
        return {"params": self.params, "tokens": self.tokens, "flops": self.flops}[kind]


Row = dict
Rule = Callable[[Row], Optional[bool]]  # True: fit, False: hold out, None: not in this split


@dataclass(frozen=True)
class Split:
    file: str
    split: str
    rule: Rule
    size: str = "params"
    two_d: bool = True
    frontier: bool = False  # keep only the lowest loss per FLOP budget (the IsoFLOP minimum)


def _f(row: Row, column: str) -> float:
    return float(row[column])


def _gadre_1d(row: Row) -> Optional[bool]:
    if _f(row, "tok_per_param") != 20.0:
        return None
    return _f(row, "params") <= 4.2e8


def _gadre_2d(row: Row) -> Optional[bool]:
    return _f(row, "params") <= 4.2e8


def _porian(row: Row) -> Optional[bool]:
    flops = _f(row, "flops")
    if flops <= 1.6e18 * 1.01:
        return True
    return False if flops >= 1.28e19 * 0.99 else None


def _olmo(held: str) -> Rule:
    fitted_sizes = {"190M", "370M", "760M", "1B"}

    def rule(row: Row) -> Optional[bool]:
        in_recipe = row["xC"] in {"1", "2", "5", "10"}
        if row["size"] in fitted_sizes and in_recipe:
            return True
        if held == "paper":
            return False if row["size"] in {"7B", "13B"} else None
        return False if row["size"] == "3B" and in_recipe else None

    return rule


def _li(row: Row) -> Optional[bool]:
    params = _f(row, "params_no_embed")
    if params <= 1e8:
        return True
    return False if params >= 9e8 else None


def _epoch(row: Row) -> Optional[bool]:
    flops = _f(row, "flops")
    if flops <= 3.4e20:
        return True
    return False if flops >= 2.6e21 else None


SPLITS: tuple = (
    *(Split(f"gadre2024_{d}.csv", "1-D M=20", _gadre_1d, two_d=False) for d in ("c4", "redpajama", "refinedweb")),
    *(Split(f"gadre2024_{d}.csv", "2-D", _gadre_2d) for d in ("c4", "redpajama", "refinedweb")),
    *(Split(f"porian2024_{d}.csv", "2-D", _porian, size="flops")
      for d in ("rw_cosine", "owt2_cosine", "rw_tuned_const", "owt2_tuned_const")),
    *(Split(f"porian2024_{d}.csv", "per-budget min", _porian, size="flops", two_d=False, frontier=True)
      for d in ("rw_cosine", "owt2_cosine", "rw_tuned_const", "owt2_tuned_const")),
    Split("olmo_ladder_bhagia2024.csv", "paper (7B, 13B)", _olmo("paper")),
    Split("olmo_ladder_bhagia2024.csv", "in-recipe (3.2B)", _olmo("in-recipe")),
    Split("li2025_misfitting_best_lr.csv", "2-D", _li),
    Split("epoch2024_chinchilla_approach3_digitised.csv", "2-D", _epoch, size="flops"),
)


def load(split: Split, directory: Optional[Path] = None) -> Ladder:
    """Read one split's rows from its CSV."""
    with open((directory or ladders_dir()) / split.file, newline="") as handle:
        rows = [(row, split.rule(row)) for row in csv.DictReader(handle)]
    rows = [(row, used) for row, used in rows if used is not None]
    if split.frontier:
        rows = _frontier(rows)
    params, tokens, loss = (np.array([_f(row, c) for row, _ in rows]) for c in ("params", "tokens", "loss"))
    fit = np.array([used for _, used in rows], dtype=bool)
    return Ladder(split.file.removesuffix(".csv"), split.split, params, tokens, loss, fit, split.size, split.two_d)


def _frontier(rows: list) -> list:
    """The lowest-loss run of every FLOP budget."""
    best: dict = {}
    for row, used in rows:
        budget = _f(row, "flops")
        if budget not in best or _f(row, "loss") < _f(best[budget][0], "loss"):
            best[budget] = (row, used)
    return [best[budget] for budget in sorted(best)]


def available() -> bool:
    return ladders_dir().is_dir()
