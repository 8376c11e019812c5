"""Loss points to fit, and reading them from a CSV written by any trainer.

The CSV has a header with `loss` and at least one of `params`, `tokens`, `flops`; `params_m`
gives params in millions instead of `params`; `name`, `width` and `seed` (for --seed-offsets) are
optional labels.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from typing import Optional

from megamu.scaling.fit import FitError

X_KINDS = ("params", "tokens", "flops")


@dataclass(frozen=True)
class LossPoint:
    """One run's loss at one point in training, with every x it can be fitted against."""

    name: str
    loss: float
    params: Optional[float] = None
    tokens: Optional[float] = None
    flops: Optional[float] = None
    width: Optional[int] = None
    step: Optional[int] = None  # the training step the loss was read at, for run directories
    seed: Optional[int] = None  # train.seed of the run, for fits with seed offsets

    def x(self, kind: str) -> float:
        value = getattr(self, kind)
        if value is None:
            raise FitError(f"point {self.name!r} has no {kind}: choose another --x or add the column")
        return value


def read_points_csv(path: str, x_kind: str) -> list:
    """Read loss points from a CSV, naming the file, line and column of any bad value."""
    try:
        # utf-8-sig: spreadsheet exports start with a byte-order mark, which would otherwise stick to the
        # first column's name.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            # The reader's own line count, so blank lines and quoted line breaks do not shift it.
            rows = [(reader.line_num, values) for values in reader if any(v.strip() for v in values)]
    except OSError as exc:
        raise FitError(f"cannot read points file {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FitError(f"{path}: not a readable CSV file ({exc}); save it as UTF-8 text, one point per line") from None
    columns = {name for name in header if name}
    _check_columns(path, columns, x_kind)
    if not rows:
        raise FitError(f"{path} has a header but no rows of points")
    return [_parse_row(path, line, header, values, columns) for line, values in rows]


def _check_columns(path: str, columns: set, x_kind: str) -> None:
    if "params" in columns and "params_m" in columns:
        raise FitError(f"{path}: both `params` and `params_m` columns given; keep one")
    available = {"params" if c == "params_m" else c for c in columns}
    missing = [c for c in ("loss",) if c not in available]
    if not available & set(X_KINDS):
        missing.append("one of params, params_m, tokens, flops")
    elif x_kind not in available:
        missing.append(x_kind if x_kind != "params" else "params (or params_m)")
    if missing:
        raise FitError(
            f"{path}: missing column(s) {', '.join(missing)}; the header has {', '.join(sorted(columns)) or 'nothing'}"
        )


def _parse_row(path: str, line: int, header: list, values: list, columns: set) -> LossPoint:
    if len(values) > len(header):
        raise FitError(f"{path}:{line}: {len(values)} values but the header names {len(header)} columns; "
                       f"remove the extra values (or quote a value holding a comma)")
    row = dict(zip(header, (value.strip() for value in values)))

    def number(column: str) -> Optional[float]:
        if column not in columns or row.get(column, "") == "":
            return None
        try:
            value = float(row[column])
        except ValueError:
            raise FitError(f"{path}:{line}: column {column} is {row[column]!r}, not a number") from None
        if not math.isfinite(value):
            raise FitError(f"{path}:{line}: column {column} is {row[column]}; every value must be finite")
        return value

    def integer(column: str) -> Optional[int]:
        value = number(column)
        if value is not None and not value.is_integer():
            raise FitError(f"{path}:{line}: column {column} is {row[column]}, not a whole number")
        return None if value is None else int(value)

    loss = number("loss")
    if loss is None:
        raise FitError(f"{path}:{line}: the loss is empty")
    if loss <= 0:
        raise FitError(f"{path}:{line}: the loss is {row['loss']}; a loss to fit must be positive")
    params = number("params")
    params_m = number("params_m")
    width = integer("width")
    seed = integer("seed")
    return LossPoint(
        name=row.get("name") or f"{path}:{line}",
        loss=loss,
        params=params_m * 1e6 if params_m is not None else params,
        tokens=number("tokens"),
        flops=number("flops"),
        width=width,
        seed=seed,
    )
