"""Data sets, loaded locally (nothing is downloaded): digits, vowels (CSV), MNIST (IDX files).

Splits follow TARGETS.md: digits stratified 70/30, vowels stratified 80/20, both seed 0. Features
are scaled to [0, 1] with the training split's min and max (test values may fall slightly outside).
"""
from __future__ import annotations

import csv
import gzip
import struct
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from sklearn.model_selection import train_test_split

from trainers.types import Dataset


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["digits", "vowels", "mnist"] = "digits"
    path: str | None = Field(default=None, description="CSV file (vowels) or folder of IDX files (mnist)")
    test_fraction: float | None = Field(default=None, gt=0.0, lt=1.0,
                                        description="default: 0.3 digits, 0.2 vowels")
    seed: int = 0
    limit: int | None = Field(default=None, ge=10, description="use only this many samples (quick runs)")


def _scale(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = x_train.min(axis=0), x_train.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (x_train - lo) / span, (x_test - lo) / span


def _split(name: str, x: np.ndarray, y: np.ndarray, cfg: DataConfig, default_test: float) -> Dataset:
    if cfg.limit is not None and cfg.limit < len(y):
        x, _, y, _ = train_test_split(x, y, train_size=cfg.limit, stratify=y, random_state=cfg.seed)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=cfg.test_fraction or default_test, stratify=y, random_state=cfg.seed
    )
    x_tr, x_te = _scale(x_tr.astype(np.float64), x_te.astype(np.float64))
    t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt)  # noqa: E731
    return Dataset(name, t(x_tr, torch.float32), t(y_tr, torch.int64), t(x_te, torch.float32),
                   t(y_te, torch.int64), n_classes=int(y.max()) + 1)


def load_digits_data(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split("digits", d.data, d.target, cfg, 0.3)


def load_vowels(cfg: DataConfig) -> Dataset:
    if not cfg.path:
        raise ValueError("data.path: vowels need the CSV path, e.g. ../shared/data/vowels_hillenbrand_women.csv")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise ValueError(f"data.path: vowels CSV '{path}' does not exist")
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    if len(header) != 14 or header[1] != "vowel":
        raise ValueError(f"data.path: '{path}' must have columns speaker, vowel and 12 formants; got {header}")
    labels = sorted({r[1] for r in body})
    x = np.array([[float(v) for v in r[2:]] for r in body])
    y = np.array([labels.index(r[1]) for r in body])
    return _split("vowels", x, y, cfg, 0.2)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        magic = fh.read(4)
        ndim = magic[3]
        shape = struct.unpack(">" + "I" * ndim, fh.read(4 * ndim))
        return np.frombuffer(fh.read(), dtype=np.uint8).reshape(shape)


def load_mnist(cfg: DataConfig) -> Dataset:
    if not cfg.path:
        raise ValueError("data.path: mnist needs the folder holding the IDX files")
    root = Path(cfg.path).expanduser()

    def find(stem: str) -> Path:
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
        raise ValueError(f"data.path: '{root}' has no {stem}[.gz]")

    x_tr = _read_idx(find("train-images-idx3-ubyte")).reshape(-1, 784) / 255.0
    y_tr = _read_idx(find("train-labels-idx1-ubyte")).astype(np.int64)
    x_te = _read_idx(find("t10k-images-idx3-ubyte")).reshape(-1, 784) / 255.0
    y_te = _read_idx(find("t10k-labels-idx1-ubyte")).astype(np.int64)
    if cfg.limit is not None:
        x_tr, y_tr = x_tr[: cfg.limit], y_tr[: cfg.limit]
    t = torch.as_tensor
    return Dataset("mnist", t(x_tr, dtype=torch.float32), t(y_tr), t(x_te, dtype=torch.float32), t(y_te), 10)


LOADERS = {"digits": load_digits_data, "vowels": load_vowels, "mnist": load_mnist}


def load_dataset(cfg: DataConfig) -> Dataset:
    return LOADERS[cfg.kind](cfg)
