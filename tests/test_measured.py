"""Measured data as a device, end to end: `--check` opens the files a config names and says what is
wrong (by the file's own line) or suspicious, readouts never pick a dead output silently, a sweep
logs the replay model's fit, and a trial that meets an error that will recur ends once, not retried.
Real CLI subprocesses, a real Ray, Tune and MLflow SQLite store."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from actors.systems.registry import build_system
from farm.datasources import DataError
from trainers.networks import pick_readout

DEAD = [1, 4]  # of 8 outputs


def lab_files(folder, rows: int = 300, seed: int = 0, sep: str = ";", decimal: str = ","):
    """x.csv (4 inputs, 1 parameter, in [0, 1]) and y.csv (8 outputs; DEAD are constant plus 1e-5
    jitter), a header line each, and a placeholder row of zeros first."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(0, 1, (rows, 5))
    s = 2 * u - 1
    y = np.tanh(s @ rng.normal(0, 1.2, (5, 8)) + rng.normal(0, 0.2, 8)) + 0.01 * rng.standard_normal((rows, 8))
    y[:, DEAD] = 0.3 + 1e-5 * rng.standard_normal((rows, len(DEAD)))
    u[0], y[0] = 0.0, 0.0

    def write(name, values, head):
        cells = [sep.join(f"{v:.6f}".replace(".", decimal) for v in row) for row in values]
        (folder / name).write_text("\n".join([sep.join(head)] + cells) + "\n")

    write("x.csv", u, ["a", "b", "c", "d", "theta"])
    write("y.csv", y, [f"y{i}" for i in range(8)])
    return folder / "x.csv", folder / "y.csv"


def device(folder, **kw) -> dict:
    x, y = lab_files(folder)
    return {"kind": "recorded", "controls_path": str(x), "responses_path": str(y), "n_inputs": 4, "n_params": 1,
            "n_outputs": 8, "input_range": [0, 1], "param_range": [0, 1], "steps": 600, "hidden": [32], **kw}


def blobs(folder, n: int = 240, classes: int = 3):
    """A 3-feature, 3-class data set as an NPZ (x in [0, 1])."""
    rng = np.random.default_rng(1)
    y = np.arange(n) % classes
    x = np.clip(0.5 + 0.25 * np.eye(3)[y] + 0.08 * rng.standard_normal((n, 3)), 0, 1)
    path = folder / "blobs.npz"
    np.savez(path, x=x, y=y)
    return path


def check(tmp_path, raw: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, "-m", "farm.cli", "sweep", str(path), "--check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def sweep_raw(tmp_path, system: dict, train: dict, name: str = "measured") -> dict:
    return {"devices": [{"name": "lab", "system": system}],
            "data": {"kind": "file", "path": str(blobs(tmp_path))},
            "train": {"method": "pat", "epochs": 1, "batch_size": 32, **train},
            "sweep": {"name": name, "trial_cpus": 1, "storage_path": str(tmp_path / "ray_results")},
            "tracking": {"experiment": name}}


def test_check_reports_the_bad_line_of_a_devices_file_before_anything_starts(tmp_path):
    raw = sweep_raw(tmp_path, device(tmp_path), {})
    y = (tmp_path / "y.csv").read_text().splitlines()
    cells = y[41].split(";")
    cells[3] = "nan"
    y[41] = ";".join(cells)  # line 42 of the file
    (tmp_path / "y.csv").write_text("\n".join(y) + "\n")
    proc = check(tmp_path, raw)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "devices[0].system (device 'lab')" in proc.stderr
    assert "y.csv: line 42, column 4 (responses) is nan" in proc.stderr and "re-measure or delete" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_check_prints_what_is_suspicious_in_the_measurements(tmp_path):
    proc = check(tmp_path, sweep_raw(tmp_path, device(tmp_path), {}))
    assert proc.returncode == 0, proc.stderr
    assert "note: device 'lab': 1 row(s) of all zeros (a placeholder?): line 2 of x.csv and line 2 of y.csv" \
        in proc.stdout
    assert f"outputs {DEAD} (0-based)" in proc.stdout


def test_pick_readout_never_takes_a_dead_output_unless_told():
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 0.0, 0.9, 0.5, 0.4, 10.0, 0.3, 0.2])  # output 1 dead, 5 the liveliest
    y = 0.3 + torch.randn(64, 8, generator=gen) * scale
    assert pick_readout("auto", y, 3) == ([0, 2, 5], [1])  # a dead one among the first: the liveliest
    assert pick_readout("vary_most", y, 1) == ([5], [1])
    assert pick_readout("first", y, 3) == ([0, 1, 2], [1])  # as asked, and the dead one named
    y[:, 1] = torch.randn(64, generator=gen)
    assert pick_readout("auto", y, 3) == ([0, 1, 2], [])


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("method,readout", [("pat", "auto"), ("pat", "first"), ("phyll", "auto")])
def test_trainers_read_live_outputs_of_a_recorded_device(tmp_path, method, readout):
    from farm.data import DataConfig, load_dataset
    from trainers.registry import method as get

    dev = build_system(device(tmp_path))
    data = load_dataset(DataConfig(kind="file", path=str(blobs(tmp_path))))
    m = get(method)
    extra = {"n_blocks": 1, "inner_steps": 1, "train_eval_size": 0} if method == "phyll" else {}
    cfg = m.config_class.model_validate({"method": method, "epochs": 1, "batch_size": 32, "readout": readout,
                                         "final_test": False, **extra})
    last = m.train(cfg, dev, data).history[-1]
    assert last["dead_outputs"] == "1,4"
    if method == "pat":
        read = [int(i) for i in last["readout_outputs"].split(",")]
        if readout == "first":
            assert read == [0, 1, 2]  # as asked; the dead output 1 among them is named above
        else:
            assert len(read) == 3 and not set(read) & set(DEAD)


def test_a_sweep_logs_the_fit_and_a_data_file_broken_after_the_check_stops_it_at_once(ray_session, tmp_path):
    """One sweep, two trials: the replay model's fit and the readout are on the MLflow runs; a data
    file broken after the config was checked stops the next sweep when it reads the data, before any
    trial or run starts."""
    from farm.config import parse_config
    from farm.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = sweep_raw(tmp_path, device(tmp_path), {"lr": {"grid": [0.01, 0.02]}},
                    name="measured-e2e")
    raw["sweep"]["max_concurrent_trials"] = 1
    cfg = parse_config(raw)
    outcome = run_sweep(cfg, tracking_uri=uri)
    client = MlflowClient(uri)
    parent = client.get_run(outcome.parent_run_id)
    tags = parent.data.tags
    assert float(tags["device.lab.holdout_relative_rmse"]) < float(tags["device.lab.linear_holdout_relative_rmse"])
    assert tags["device.lab.dead_outputs"] == str(DEAD) and tags["device.lab.rows"] == "300"
    assert "devices.json" in {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert "device.lab.mismatch" not in client.get_run(outcome.rows[0].run_id).data.params  # no meaning here
    for row in outcome.rows:
        run = client.get_run(row.run_id)
        read = {int(i) for i in run.data.params["model.readout_outputs"].split(",")}
        assert run.data.params["model.dead_outputs"] == "1,4" and len(read) == 3 and not read & set(DEAD)
        assert run.data.tags["device.lab.dead_outputs"] == str(DEAD)

    # the data file breaks after the check: the sweep reads it once, before Ray runs any trial and
    # before any MLflow run is opened, and stops with the error's row (a trial never meets it)
    bad = parse_config(sweep_raw(tmp_path, device(tmp_path), {}, name="measured-bad"))
    data = np.load(bad.data.path)
    x = data["x"].copy()
    x[7, 1] = np.nan
    np.savez(bad.data.path, x=x, y=data["y"])
    with pytest.raises(DataError, match=r"x row 8 \(1-based\) holds a non-finite value"):
        run_sweep(bad, tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r for r in runs if r.data.tags.get("physfarm.sweep") == "measured-bad"]


def test_check_names_the_line_of_a_bad_data_set_file(tmp_path):
    """A data set CSV (semicolons, decimal commas, a header) with a NaN on line 6: --check names it."""
    rng = np.random.default_rng(0)
    lines = ["f1;f2;f3;label"] + [";".join(f"{v:.3f}".replace(".", ",") for v in rng.uniform(0, 1, 3)) + f";{i % 3}"
                                   for i in range(60)]
    lines[5] = "0,5;nan;0,25;1"
    path = tmp_path / "set.csv"
    path.write_text("\n".join(lines) + "\n")
    raw = sweep_raw(tmp_path, {"kind": "oscillators", "n": 8}, {})
    raw["data"] = {"kind": "file", "path": str(path)}
    proc = check(tmp_path, raw)
    assert proc.returncode == 2
    assert "set.csv: line 6, column 2 is nan" in proc.stderr, proc.stderr
    lines[5] = "0,5;0,5;0,25;1"  # fixed: the same file reads, its dialect detected
    path.write_text("\n".join(lines) + "\n")
    proc = check(tmp_path, raw)
    assert proc.returncode == 0, proc.stderr
