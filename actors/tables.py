"""Numeric tables as labs write them: CSV (comma, tab, semicolon or spaces; decimal point or comma; a
header line or none), NPZ, and Parquet where pandas and pyarrow are installed.

`read_table(path, ...)` returns a `Table`: the values as float64 [rows, columns] and, for each row, where
it sits in the file in the file's own 1-based numbering (a CSV's line, an NPZ or Parquet file's row),
so that every message about a row points at what the user sees in an editor. Nothing here knows what
the columns mean; callers (a recorded device, a data set) check widths and ranges with `Table.where`.

Detection (CSV, settings left at "auto"): every (delimiter, decimal) pair is tried on the first
`SAMPLE_LINES` non-blank lines; the pairs under which at least 80 % of those lines
split into the same number (>= 2) of numbers are the candidates (the rest are reported, by line, when
read). One candidate, or several that agree on the
column count, is taken (in the order tab, semicolon, comma, spaces); candidates that disagree are
reported as ambiguous with the setting that settles it. The first line is a header when it does not
parse as numbers under the chosen dialect.
"""
from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_LINES = 50
DELIMITERS = {"tab": "\t", "semicolon": ";", "comma": ",", "space": " "}  # order: preference on a tie
DECIMALS = {"point": ".", "comma": ","}


class TableError(ValueError):
    """A file that cannot be read as a numeric table; the message names the file, the line and the fix."""


@dataclass
class Table:
    path: Path
    values: np.ndarray  # [rows, columns] float64
    positions: np.ndarray  # [rows] 1-based line (CSV) or row (NPZ, Parquet) of each row in the file
    unit: str  # "line" or "row"
    columns: list[str] | None = None  # header names, where the file has them
    dialect: str = ""  # what was detected, for messages ("semicolon-separated, decimal comma, header")

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    def where(self, i: int) -> str:
        """Row i (0-based in `values`) as the file numbers it: 'line 12' or 'row 12'."""
        return f"{self.unit} {int(self.positions[i])}"

    def select(self, keep: np.ndarray) -> "Table":
        return Table(self.path, self.values[keep], self.positions[keep], self.unit, self.columns, self.dialect)


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", newline="")
    return path.open(newline="", encoding="utf-8-sig")  # a BOM written by spreadsheet programs is dropped


def _split(line: str, delimiter: str) -> list[str]:
    if delimiter == " ":
        return line.split()
    return [c.strip() for c in next(csv.reader([line], delimiter=delimiter))]


def _numbers(cells: list[str], decimal: str) -> list[float] | None:
    try:
        if decimal == ",":
            return [float(c.replace(",", ".")) for c in cells]
        return [float(c) for c in cells]
    except ValueError:
        return None


def _detect(sample: list[str], delimiter: str, decimal: str, path: Path) -> tuple[str, str, int]:
    """(delimiter, decimal, columns) under which the sampled lines read as the same number (>= 2) of numbers.

    A few bad lines (a stray word, a short line) do not hide the dialect: a pair qualifies when at
    least 80 % of the sample reads so; the bad lines are then reported by the reader, by line."""
    delims = list(DELIMITERS.values()) if delimiter == "auto" else [delimiter]
    decs = list(DECIMALS.values()) if decimal == "auto" else [decimal]
    need = max(1, int(0.8 * len(sample)))
    fits: list[tuple[str, str, int]] = []
    for d in delims:
        for p in decs:
            if d == p:
                continue  # a comma cannot be both
            widths: dict[int, int] = {}
            for line in sample:
                vals = _numbers(_split(line, d), p)
                if vals is not None:
                    widths[len(vals)] = widths.get(len(vals), 0) + 1
            if widths:
                width, count = max(widths.items(), key=lambda kv: kv[1])
                if width >= 2 and count >= need:
                    fits.append((d, p, width))
    names = {v: k for k, v in DELIMITERS.items()}
    if not fits:
        line = sample[0][:80]
        raise TableError(
            f"{path}: cannot read its lines as columns of numbers (tried comma, tab, semicolon and space "
            f"separators, decimal point and comma), e.g. {line!r}; set `delimiter` and `decimal` to the "
            f"file's, or check that every data line has the same number of numeric cells")
    if len({w for _, _, w in fits}) > 1:
        options = ", ".join(f"{names[d]} ({w} columns{', decimal comma' if p == ',' else ''})"
                            for d, p, w in fits)
        raise TableError(f"{path}: the separator is ambiguous: the lines read as {options}; set "
                         f"`delimiter` (comma, tab, semicolon, space) and `decimal` (point, comma)")
    return fits[0]


def read_csv(path: Path, delimiter: str = "auto", decimal: str = "auto", header: str | bool = "auto") -> Table:
    """A CSV-like text table; see the module docstring for what is detected."""
    delimiter = DELIMITERS.get(delimiter, delimiter)
    decimal = DECIMALS.get(decimal, decimal)
    with _open_text(path) as fh:
        lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(fh, start=1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if not lines:
        raise TableError(f"{path}: the file is empty; it needs one line per measurement")
    sample = [line for _, line in lines[:SAMPLE_LINES]]  # a header line among them is one that fails
    d, p, width = _detect(sample, delimiter, decimal, path)
    first = _split(lines[0][1], d)
    first_vals = _numbers(first, p)
    has_header = (first_vals is None) if header == "auto" else bool(header)
    if has_header and len(lines) == 1:
        raise TableError(f"{path}: only a header line, no data")
    columns = None
    if has_header:
        if len(first) != width:
            raise TableError(f"{path}: the header (line {lines[0][0]}) has {len(first)} names but the data "
                             f"lines have {width} columns; fix the header or set `header: false`")
        columns = first
        rows = lines[1:]
    else:
        if first_vals is None:
            bad = next(c for c in first if _numbers([c], p) is None)
            raise TableError(f"{path}: line {lines[0][0]} has a value that is not a number, {bad!r}, and "
                             f"`header: false` says it is data; set `header: true` (or auto) if it names "
                             f"the columns")
        rows = lines
    values = np.empty((len(rows), width), dtype=np.float64)
    positions = np.empty(len(rows), dtype=np.int64)
    for i, (n, line) in enumerate(rows):
        cells = _split(line, d)
        if len(cells) != width:
            raise TableError(f"{path}: line {n} has {len(cells)} columns, the others {width}; every line "
                             f"needs the same columns (a missing or extra separator?)")
        vals = _numbers(cells, p)
        if vals is None:
            j, bad = next((j, c) for j, c in enumerate(cells) if _numbers([c], p) is None)
            raise TableError(f"{path}: line {n}, column {j + 1} is {bad!r}, not a number; every cell after "
                             f"the header must be a number (fix or delete that line)")
        values[i] = vals
        positions[i] = n
    names = {v: k for k, v in DELIMITERS.items()}
    dialect = (f"{names[d]}-separated, decimal {'comma' if p == ',' else 'point'}, "
               f"{'a header line' if has_header else 'no header'}")
    return Table(path, values, positions, "line", columns, dialect)


def read_npz(path: Path, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """The NPZ file's arrays (all, or those named)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in (keys if keys is not None else z.files) if k in z.files}
    except (OSError, ValueError) as err:
        raise TableError(f"{path}: not a readable NPZ file ({err})") from None


def read_parquet(path: Path) -> Table:
    try:
        import pandas as pd  # noqa: F401 - pandas reads Parquet through pyarrow
        frame = pd.read_parquet(path)
    except ImportError as err:
        raise TableError(f"{path}: reading Parquet needs pandas and pyarrow ({err}); `pip install pyarrow`, "
                         f"or save the table as CSV or NPZ") from None
    except Exception as err:  # noqa: BLE001 - pyarrow's errors carry the reason
        raise TableError(f"{path}: not a readable Parquet file ({err})") from None
    bad = [c for c in frame.columns if not np.issubdtype(frame[c].dtype, np.number)]
    if bad:
        raise TableError(f"{path}: columns {bad[:5]} are not numeric; every column must hold numbers")
    values = frame.to_numpy(dtype=np.float64)
    return Table(path, values, np.arange(1, len(values) + 1), "row", [str(c) for c in frame.columns], "parquet")


def array_table(path: Path, values: np.ndarray, name: str) -> Table:
    """An array read from an NPZ file as a Table (rows numbered from 1)."""
    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise TableError(f"{path}: array '{name}' has shape {list(values.shape)}; it must be [rows, columns]")
    try:
        values = values.astype(np.float64)
    except (TypeError, ValueError):
        raise TableError(f"{path}: array '{name}' holds {values.dtype}, not numbers") from None
    return Table(path, values, np.arange(1, len(values) + 1), "row", None, f"npz array '{name}'")


def read_table(path: str | Path, delimiter: str = "auto", decimal: str = "auto",
               header: str | bool = "auto") -> Table:
    """One numeric table from CSV (also .tsv, .txt, .gz), Parquet, or an NPZ holding one array."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TableError(f"'{path}' does not exist (or is not a file); check the path (relative paths are "
                         f"read from the folder the command runs in)")
    suffix = path.name.lower()
    if suffix.endswith(".parquet") or suffix.endswith(".pq"):
        return read_parquet(path)
    if suffix.endswith(".npz"):
        arrays = read_npz(path)
        if len(arrays) != 1:
            raise TableError(f"{path}: an NPZ table holds one array; it has {sorted(arrays)}")
        (name, values), = arrays.items()
        return array_table(path, values, name)
    try:
        return read_csv(path, delimiter, decimal, header)
    except UnicodeDecodeError:
        raise TableError(f"{path}: not a text file (CSV); use CSV, NPZ or Parquet") from None


def first_non_finite(table: Table, what: str = "") -> str | None:
    """A message naming the first cell that is NaN or infinite, or None."""
    bad = ~np.isfinite(table.values)
    if not bad.any():
        return None
    i, j = (int(a) for a in np.argwhere(bad)[0])
    return (f"{table.path}: {table.where(i)}, column {j + 1}{what} is {table.values[i, j]}; every value must "
            f"be a finite number (re-measure or delete that {table.unit})")


__all__ = ["Table", "TableError", "read_table", "read_csv", "read_npz", "read_parquet", "array_table",
           "first_non_finite"]
