"""The measured rows behind a `recorded` device: read from the files a lab has, checked, described.

Layouts (`RecordedConfig`):
  path                             one table: n_inputs + n_params control columns, then n_outputs
                                   response columns (CSV, Parquet); or an NPZ with arrays `controls`
                                   and `responses`, or `x`, optional `theta`, and `y`
  controls_path + responses_path   two tables with the same rows: the controls (x then theta) and the
                                   responses (CSV, Parquet, or an NPZ holding one array each)

`read_measurements(cfg)` returns `Measurements`: controls u [N, n_inputs + n_params], responses
y [N, n_outputs] (float64), where each row sits in its file(s), and what is suspicious about them:
rows of all zeros (a placeholder row left in by acquisition software), rows repeated exactly, and
outputs that never vary (a dead channel: its spread, the range of its middle 90 % of values, below
`dead_tolerance` times the largest output's).
Those are reported, and the rows dropped where `drop` says so; dead outputs stay (the device has them)
and readouts never pick them unless told to. Anything malformed raises `TableError` naming the file,
its own 1-based line (CSV) or row (NPZ, Parquet), and the fix.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..outputs import dead_outputs
from ..tables import Table, TableError, array_table, first_non_finite, read_npz, read_table
from .configs import RecordedConfig


@dataclass
class Measurements:
    u: np.ndarray  # [N, n_controls] float64, x then theta
    y: np.ndarray  # [N, n_outputs] float64
    sources: list[Table]  # the table(s) read, their rows aligned with u and y
    files: list[Path]
    zero_rows: list[int] = field(default_factory=list)  # 0-based indices into the rows as read
    duplicate_rows: list[int] = field(default_factory=list)  # later repeats of an earlier row
    dead_outputs: list[int] = field(default_factory=list)  # 0-based output indices
    dropped: dict[str, int] = field(default_factory=dict)
    rows_read: int = 0

    def where(self, i: int) -> str:
        """Row i of the rows as read, in the file's own numbering (both files' when there are two)."""
        parts = [f"{t.where(i)} of {t.path.name}" for t in self.sources]
        return " and ".join(parts) if len(parts) > 1 else parts[0]

    def notes(self) -> list[str]:
        """What a person should know about these rows, one sentence each (printed by --check, logged)."""
        out = []

        def some(idx: list[int]) -> str:
            shown = ", ".join(self.where(i) for i in idx[:3])
            return shown + (f" and {len(idx) - 3} more" if len(idx) > 3 else "")

        if self.zero_rows:
            act = "dropped" if "zero_rows" in self.dropped else "kept; add zero_rows to `drop` to leave them out"
            out.append(f"{len(self.zero_rows)} row(s) of all zeros (a placeholder?): {some(self.zero_rows)}; {act}")
        if self.duplicate_rows:
            act = ("dropped" if "duplicate_rows" in self.dropped
                   else "kept; add duplicate_rows to `drop` to leave them out")
            out.append(f"{len(self.duplicate_rows)} row(s) repeat an earlier row exactly: "
                       f"{some(self.duplicate_rows)}; {act}")
        if self.dead_outputs:
            out.append(f"{len(self.dead_outputs)} of {self.y.shape[1]} outputs never vary (spread below the "
                       f"dead_tolerance): outputs {self.dead_outputs} (0-based); readouts leave them out "
                       f"unless a `readout` list names them")
        return out

    def summary(self) -> dict:
        return {"rows_read": self.rows_read, "rows": int(self.u.shape[0]), "files": [str(f) for f in self.files],
                "zero_rows": len(self.zero_rows), "duplicate_rows": len(self.duplicate_rows),
                "dropped_rows": dict(self.dropped), "dead_outputs": list(self.dead_outputs)}


def data_files(cfg: RecordedConfig) -> list[Path]:
    """The measured file(s) the config names; TableError if one is missing."""
    names = [cfg.path] if cfg.path else [cfg.controls_path, cfg.responses_path]
    paths = [Path(n).expanduser() for n in names]
    for path in paths:
        if not path.is_file():
            raise TableError(f"recorded device: data file '{path}' does not exist; set "
                             f"{'path' if cfg.path else 'controls_path / responses_path'} to the measured file(s)")
    return paths


def content_digest(cfg: RecordedConfig) -> str:
    """sha256 over the bytes of every data file (what a cached fit is keyed by, with the settings)."""
    h = hashlib.sha256()
    for path in data_files(cfg):
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _read(path: Path, cfg: RecordedConfig) -> Table:
    return read_table(path, cfg.delimiter, cfg.decimal, cfg.header)


def _one_file(cfg: RecordedConfig, n_ctrl: int) -> tuple[Table, Table]:
    path = data_files(cfg)[0]
    if path.name.lower().endswith(".npz"):
        arrays = read_npz(path)
        if {"controls", "responses"} <= set(arrays):
            return array_table(path, arrays["controls"], "controls"), array_table(path, arrays["responses"], "responses")
        if {"x", "y"} <= set(arrays):
            x = array_table(path, arrays["x"], "x")
            if "theta" in arrays:
                theta = array_table(path, arrays["theta"], "theta")
                if theta.n_rows != x.n_rows:
                    raise TableError(f"{path}: {x.n_rows} rows of x but {theta.n_rows} of theta")
                x = Table(path, np.concatenate([x.values, theta.values], 1), x.positions, "row", None, x.dialect)
            return x, array_table(path, arrays["y"], "y")
        raise TableError(f"{path}: an NPZ needs arrays 'controls' and 'responses' (or 'x', optional 'theta', "
                         f"and 'y'); it has {sorted(arrays)}")
    table = _read(path, cfg)
    width = n_ctrl + cfg.n_outputs
    if table.values.shape[1] != width:
        raise TableError(
            f"{path}: {table.values.shape[1]} columns ({table.dialect}), expected {width}: n_inputs + n_params "
            f"= {n_ctrl} controls, then n_outputs = {cfg.n_outputs} responses; fix the layout in the config, "
            f"or give the controls and responses as two files (controls_path, responses_path)")
    u = Table(path, table.values[:, :n_ctrl], table.positions, table.unit, table.columns, table.dialect)
    y = Table(path, table.values[:, n_ctrl:], table.positions, table.unit, table.columns, table.dialect)
    return u, y


def read_measurements(cfg: RecordedConfig) -> Measurements:
    """Read, check and describe the measured rows (see the module docstring)."""
    n_ctrl = cfg.n_inputs + cfg.n_params
    files = data_files(cfg)
    if cfg.path:
        ut, yt = _one_file(cfg, n_ctrl)
        sources = [ut]
    else:
        ut, yt = (_read(p, cfg) if not p.name.lower().endswith(".npz") else _npz_one(p) for p in files)
        sources = [ut, yt]
    for name, table, want, fix in (("controls", ut, n_ctrl, "n_inputs + n_params"),
                                   ("responses", yt, cfg.n_outputs, "n_outputs")):
        if table.values.shape[1] != want:
            raise TableError(f"{table.path}: the {name} have {table.values.shape[1]} columns ({table.dialect}), "
                             f"expected {fix} = {want}; fix the config's layout or the file")
        bad = first_non_finite(table, f" ({name})")
        if bad:
            raise TableError(bad)
    if ut.n_rows != yt.n_rows:
        raise TableError(f"{ut.path.name} has {ut.n_rows} rows of controls but {yt.path.name} has {yt.n_rows} of "
                         f"responses; the files must hold the same measurements, row for row")
    m = Measurements(ut.values, yt.values, sources, files, rows_read=ut.n_rows)
    _check_envelope(m, cfg)
    _describe(m, cfg)
    keep = np.ones(m.u.shape[0], dtype=bool)
    for what, idx in (("zero_rows", m.zero_rows), ("duplicate_rows", m.duplicate_rows)):
        if what in cfg.drop and idx:
            keep[idx] = False
            m.dropped[what] = len(idx)
    if not keep.all():
        m.u, m.y = m.u[keep], m.y[keep]
    return m


def _npz_one(path: Path) -> Table:
    arrays = read_npz(path)
    if len(arrays) != 1:
        raise TableError(f"{path}: as controls_path or responses_path an NPZ holds one array; it has "
                         f"{sorted(arrays)}")
    (name, values), = arrays.items()
    return array_table(path, values, name)


def _check_envelope(m: Measurements, cfg: RecordedConfig) -> None:
    lo = np.array([cfg.input_range[0]] * cfg.n_inputs + [cfg.param_range[0]] * cfg.n_params)
    hi = np.array([cfg.input_range[1]] * cfg.n_inputs + [cfg.param_range[1]] * cfg.n_params)
    outside = (m.u < lo) | (m.u > hi)
    if outside.any():
        i, j = (int(a) for a in np.argwhere(outside)[0])
        field_, rng = ("x", cfg.input_range) if j < cfg.n_inputs else ("theta", cfg.param_range)
        raise TableError(f"{m.where(i)}: control column {j + 1} ({field_}) is {m.u[i, j]:.6g}, outside the "
                         f"declared {field_} range {list(rng)}; widen "
                         f"{'input_range' if field_ == 'x' else 'param_range'} or delete that row")


def _describe(m: Measurements, cfg: RecordedConfig) -> None:
    rows = np.concatenate([m.u, m.y], axis=1)
    m.zero_rows = np.flatnonzero(~rows.any(axis=1)).tolist()
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    m.duplicate_rows = np.flatnonzero(first[inverse.reshape(-1)] != np.arange(rows.shape[0])).tolist()
    m.dead_outputs = dead_outputs(m.y, cfg.dead_tolerance)


__all__ = ["Measurements", "read_measurements", "content_digest", "data_files", "dead_outputs", "TableError"]
