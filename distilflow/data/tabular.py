"""Numeric tables from the user's files: ``.csv`` (a header line, then one sample per line) and ``.npz``.

Shared by the classifier's data files (data/classification.py) and ``distilflow predict``
(deploy/predict.py). Every problem is one :class:`UserError` naming the file, the line and the
column: the csv module reads the file (closed by a ``with``) and each value is parsed here, so
neither an unclosed file's ``ResourceWarning`` nor numpy's ``genfromtxt`` warnings reach the user.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from distilflow.errors import UserError


def read_csv_table(path: str | Path, where: str) -> tuple[list[str], np.ndarray]:
    """``(header, table)`` of a CSV file: column names and a ``(rows, columns)`` float64 array.

    ``where`` names the file in messages (e.g. ``"data file 'train.csv'"``). Refused with one
    line: a file that is not UTF-8, no header, a column named twice, no data rows, a line with
    another number of values than the header, an empty value, a value that is not a finite number.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text") from None
    except (csv.Error, OSError) as exc:
        raise UserError(f"{where} could not be read as CSV ({exc})") from None
    if not lines or not any(name.strip() for name in lines[0]):
        raise UserError(f"{where} has no header line (column names separated by commas)")
    header = [name.strip() for name in lines[0]]
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise UserError(f"{where} has column '{twice[0]}' twice; column names must be unique")
    rows = [(number, line) for number, line in enumerate(lines[1:], start=2) if line]  # blank lines: none
    if not rows:
        raise UserError(f"{where} has no data rows (only the header)")
    table = np.empty((len(rows), len(header)), dtype=np.float64)
    for i, (number, line) in enumerate(rows):
        if len(line) != len(header):
            raise UserError(f"{where} line {number} has {len(line)} values; the header has {len(header)} columns")
        for j, text in enumerate(line):
            table[i, j] = _number(text, f"{where} line {number}, column '{header[j]}'")
    return header, table


def _number(text: str, where: str) -> float:
    value = text.strip()
    if not value:
        raise UserError(f"{where}: an empty value; every value must be a number")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{where}: {value[:40]!r} is not a number") from None
    if not math.isfinite(number):
        raise UserError(f"{where}: {value!r} is not a finite number")
    return number


def read_npz_arrays(
    path: str | Path, names: tuple[str, ...], where: str, *, optional: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """The arrays ``names`` of an ``.npz`` file, and those of ``optional`` it holds, read without
    unpickling (object arrays refused)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            files = set(f.files)
            if not set(names) <= files:
                need = " and ".join(f"'{n}'" for n in names)
                raise UserError(f"{where} holds arrays {sorted(files)}; it needs {need}")
            present = [*names, *(n for n in optional if n in files and n not in names)]
            return {name: _array(f, name, where) for name in present}
    except UserError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, pickle refusals, truncated members, not an .npz at all
        raise UserError(f"{where} is not a readable .npz file ({type(exc).__name__}: {exc})"[:300]) from None


def _array(f, name: str, where: str) -> np.ndarray:
    try:
        return f[name]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UserError(
                f"{where}: array '{name}' holds Python objects (object arrays are pickles and are never "
                "loaded); save numbers, e.g. np.asarray(x, dtype=np.float32)"
            ) from None
        raise
