"""Bad configs fail before Ray starts: exit code 2, one line naming the field path, nothing written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from farm.config import parse_config
from farm.errors import ConfigError

GOOD = {
    "devices": [{"name": "osc", "system": {"kind": "oscillators", "n": 16}}],
    "data": {"kind": "digits"},
    # a 16-input device meets the 64 digit pixels pooled to 4x4 (refused without an encoder: see below)
    "train": {"method": "pat", "epochs": 1, "lr": {"grid": [0.01, 0.1]},
              "encoder": {"kind": "downsample", "size": [4, 4]}},
    "sweep": {"name": "t"},
}


def _with(path: str, value):
    cfg = yaml.safe_load(yaml.safe_dump(GOOD))
    node = cfg
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    node[keys[-1]] = value
    return cfg


BAD = [
    # (config, field path expected in the message, words expected)
    (_with("train.epoch", 3), "train.epoch", "unknown field"),
    (_with("sweep.num_sample", 3), "sweep.num_sample", "unknown field"),
    (_with("train.epochs", "many"), "train.epochs", "valid integer"),
    (_with("train.lr", {"grid": [0.01, "fast"]}), "train.lr", "valid number"),
    (_with("devices.0.system", {"kind": "lazer"}), "devices[0].system.kind", "unknown system kind 'lazer'"),
    (_with("devices.0.system", {"kind": "oscillators", "noize": 1}), "devices[0].system.noize", "unknown field"),
    (_with("devices.0.system", {"kind": "oscillators", "n": "big"}), "devices[0].system.n", "valid integer"),
    (_with("train.lr", {"grid": []}), "train.lr", "'grid' needs a non-empty list"),
    (_with("train.lr", {"loguniform": [0, 1]}), "train.lr", "0 < low < high"),
    (_with("train.device", "plate"), "train.device", "not a configured device"),
    (_with("train.method", "magic"), "train.method", "unknown training method 'magic'"),
    (_with("devices", []), "devices", "at least 1"),
    (_with("data.kind", "cifar"), "data.kind", "'fashion_mnist', 'mnist', 'mnist_sample', 'file' or 'function'"),
    (_with("data", {"kind": "vowels", "path": "/no/such.csv"}), "data.path", "does not exist"),
    (_with("data", {"kind": "fashion_mnist", "path": "/no/such/folder"}), "data.path", "does not exist"),
    (_with("data", {"kind": "function"}), "data.function", "required"),
    # honest selection: nothing ranks, stops or clones trials by test
    (_with("sweep.metric", "test_accuracy"), "sweep.metric", "Rank by val_accuracy"),
    (_with("sweep", {"metric": "val_loss", "mode": "max"}), "sweep.mode", "use mode: min"),
    # no silent truncation: more features than device inputs needs an encoder
    (_with("train.encoder", None), "train", "Choose train.encoder"),
    (_with("train.encoder", {"kind": "patches", "patch": 3}), "train", "does not divide the 8x8 images"),
    (_with("train.encoder", {"kind": "patches"}), "train.encoder", "encoder.patch: required"),
    (_with("train.readout", [0, 1, 2]), "train", "10 distinct indices below 16"),
    (_with("devices.0.system", {"kind": "oscillators", "n": 16, "n_outputs": 8}), "train",
     "gives 8 outputs but the data set has 10 classes"),
    (_with("train.layers", [{"device": "osc"}, {"device": "laser"}]), "train.layers[1].device",
     "not a configured device"),
]


@pytest.mark.parametrize("raw, path, words", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_config_names_the_field(raw, path, words):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    msg = str(err.value)
    assert msg.startswith(path + ":") or f"{path}:" in msg, msg
    assert words in msg, msg
    assert "\n" not in msg


def test_good_config_fills_in_the_only_device():
    cfg = parse_config(yaml.safe_load(yaml.safe_dump(GOOD)))
    assert cfg.train["device"] == "osc"
    assert set(cfg.sampled_paths()) == {"train.lr"}
    assert cfg.devices[0].system["eta"] == 0.1  # the system's defaults are resolved and saved


def _cli(tmp_path: Path, raw) -> subprocess.CompletedProcess:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return subprocess.run([sys.executable, "-m", "farm.cli", "sweep", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("raw, path", [
    (_with("train.epoch", 3), "train.epoch"),
    (_with("train.epochs", "many"), "train.epochs"),
    (_with("devices.0.system", {"kind": "lazer"}), "devices[0].system.kind"),
    (_with("train.seed", {"choice": []}), "train.seed"),
    ("devices: [oops\n", "not valid YAML at line 2"),
])
def test_cli_exits_2_with_one_line_before_anything_starts(tmp_path, raw, path):
    proc = _cli(tmp_path, raw)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("physfarm: config error:") and path in lines[0]
    assert proc.stdout == ""
    # Nothing started, nothing written: no Ray session, no MLflow store, no Tune results.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
    assert "Ray" not in proc.stderr


def test_file_store_uri_is_refused_with_the_fix(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(GOOD))
    proc = subprocess.run([sys.executable, "-m", "farm.cli", "sweep", "c.yaml", "--tracking-uri", "./mlruns"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "tracking.uri" in proc.stderr and "file store" in proc.stderr and "sqlite:///" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


@pytest.mark.parametrize("key, shown", [
    ("t!!python/object:os.system racking", "'t!!python/object:os.system racking'"),  # a YAML tag pasted in
    ("lr ", "train.'lr '"),
    ("lr.max", "train.'lr.max'"),
])
def test_a_key_that_is_not_a_plain_name_is_quoted_in_the_field_path(key, shown):
    """Found by the config fuzz: `a.b c: unknown field` read as the path a -> 'b c'. Quoted, a key's
    dots, spaces and colons are not mistaken for steps of the path."""
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in GOOD.items()}
    if key.startswith("lr"):
        cfg["train"] = {**cfg["train"], key: 0.1}
    else:
        cfg[key] = 1
    with pytest.raises(ConfigError) as err:
        parse_config(cfg)
    assert str(err.value).startswith(f"{shown}: unknown field (check the spelling"), str(err.value)


def _mixed(train_extra: dict) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(GOOD))
    cfg["train"] = {**cfg["train"], "method": {"grid": ["pat", "phyll"]}, **train_extra}
    return cfg


@pytest.mark.parametrize("cfg, start", [
    # found by the config fuzz in CI: a sweep over methods reports its unknown keys by its own route
    (_mixed({"lr ": None}), "train.'lr ': not a field of method"),
    # a key holding something shaped like a search space is checked as one before it is found unknown
    ({**GOOD, "train": {**GOOD["train"], "lr ": {"grid": 2}}}, "train.'lr ': "),
    ({**GOOD, "train": {**GOOD["train"], "a.b": {"uniform": [1.0]}}}, "train.'a.b': "),
    # PBT's mutations name train keys under the scheduler
    ({**GOOD, "train": {**GOOD["train"], "lr": 0.01},
      "sweep": {"name": "t", "scheduler": {"kind": "pbt", "perturbation_interval": 1,
                                           "hyperparam_mutations": {"lr ": [0.01, 0.02]}}}},
     "sweep.scheduler.hyperparam_mutations.'lr ': "),
])
def test_every_route_to_a_config_error_quotes_an_odd_key(cfg, start):
    with pytest.raises(ConfigError) as err:
        parse_config(cfg)
    assert str(err.value).startswith(start), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("path, keys", [
    ("train.lr", ["train", "lr"]), ("train.'lr '", ["train", "lr "]), ("train.'a.b'.x", ["train", "a.b", "x"]),
    ("train.\"it's\"", ["train", "it's"]),
])
def test_split_path_reads_back_what_join_path_writes(path, keys):
    from farm.errors import join_path, split_path

    assert split_path(path) == keys
    built = keys[0]
    for k in keys[1:]:
        built = join_path(built, k)
    assert split_path(built) == keys
