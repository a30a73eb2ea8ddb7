"""`physfarm train`: one training without Tune, a plain-text progress bar on stderr, one MLflow run
with the same params, metrics and artifacts as a sweep's trial. Real Ray (the device actor) and
MLflow (SQLite)."""
from __future__ import annotations

import yaml
from mlflow.tracking import MlflowClient

from farm.cli import main
from trainers.registry import METHODS


def _write(tmp_path, train: dict, uri: str):
    raw = {"devices": [{"name": "osc", "system": {"kind": "oscillators", "n": 16}}],
           "data": {"kind": "digits", "limit": 200},
           "train": {"epochs": 2, "batch_size": 32, "encoder": {"kind": "downsample", "size": [4, 4]}, **train},
           "sweep": {"name": "one"},
           "tracking": {"uri": uri, "experiment": "train"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_train_runs_once_with_progress_and_logs_one_run(tmp_path, sqlite_uri, capsys, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "local")
    first = "phyll" if "phyll" in METHODS else "pat"
    train = {"method": {"grid": [first, "pat"]}, "lr": {"grid": [0.02, 0.1]}, "seed": {"choice": [3, 4]},
             "pat": {"n_layers": 1}}
    if first == "phyll":
        train["phyll"] = {"n_blocks": 1, "train_eval_size": 0}
    path = _write(tmp_path, train, sqlite_uri)
    try:
        code = main(["train", path])
    finally:
        ray.shutdown()
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(("physfarm train:", "["))]
    assert any(ln.startswith(f"physfarm train: train.method: grid -> '{first}'") for ln in lines)
    assert any(ln.startswith("physfarm train: train.lr: grid -> 0.02") for ln in lines)
    bars = [ln for ln in lines if ln.startswith("[")]  # stderr is not a terminal: a line per epoch
    assert [b.split("]")[1].split()[:2] for b in bars] == [["epoch", "1/2"], ["epoch", "2/2"]]
    assert "loss" in bars[-1] and "val" in bars[-1] and "device_s" in bars[-1]
    assert f"Trained {first} on device 'osc'" in out

    client = MlflowClient(sqlite_uri)
    exp = client.get_experiment_by_name("train")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["physfarm.kind"] == "train"
    params = run.data.params
    assert params["train.method"] == first and params["train.lr"] == "0.02" and params["train.seed"] == "3"
    assert params["train.device"] == "osc" and params["data.kind"] == "digits"
    if first == "phyll":  # its section merged in, pat's left out
        assert params["train.n_blocks"] == "1" and "train.n_layers" not in params
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [2]  # once, at the end
    assert {"loss", "device_s_total", "queue_wait_s_total"} <= set(run.data.metrics)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model", "plots", "eval"} <= arts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/learning_curve.png", "plots/confusion_matrix.png"}
    assert "model/params.npz" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}


def test_train_refuses_ranges_before_anything_starts(tmp_path, capsys):
    path = _write(tmp_path, {"lr": {"loguniform": [0.001, 0.1]}}, f"sqlite:///{tmp_path / 'm.db'}")
    assert main(["train", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr: 'loguniform' is a search space" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
