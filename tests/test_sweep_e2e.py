"""End to end on a real Ray, real Tune and a real MLflow SQLite store: a tiny PAT sweep."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from farm.config import parse_config
from farm.pool import find_device
from farm.sweep import run_sweep
from farm.tracking import PARENT_TAG


def _config(tmp_path, **train):
    return parse_config({
        "devices": [
            {"name": "osc", "system": {"kind": "oscillators", "n": 16, "seed": 0}},
            {"name": "broken", "system": {"kind": "oscillators", "n": 16, "fault_rate": 1.0}},
        ],
        "data": {"kind": "digits", "limit": 300},
        "train": {"method": "pat", "device": "osc", "epochs": 1, "batch_size": 32, **train},
        "sweep": {"name": "e2e", "trial_cpus": 1, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"experiment": "e2e"},
    })


def _children(client, outcome):
    exp = client.get_experiment_by_name(outcome.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == outcome.parent_run_id]
    return parents, children


def test_tiny_sweep_logs_parent_and_children(ray_session, tmp_path, sqlite_uri):
    cfg = _config(tmp_path, lr={"grid": [0.01, 0.05]})
    outcome = run_sweep(cfg, tracking_uri=sqlite_uri)

    assert len(outcome.rows) == 2
    assert all(r.status == "TERMINATED" for r in outcome.rows)
    assert sorted(r.config["lr"] for r in outcome.rows) == [0.01, 0.05]
    for r in outcome.rows:
        assert 0.0 <= r.metrics["test_accuracy"] <= 1.0 and r.metrics["epoch"] == 1
        assert r.metrics["device_s"] > 0  # accounted at the device actor
    assert find_device("osc") is None  # devices the sweep started are stopped at its end

    client = MlflowClient(sqlite_uri)
    parents, children = _children(client, outcome)
    assert [p.info.run_id for p in parents] == [outcome.parent_run_id]
    assert parents[0].info.status == "FINISHED"
    assert "physfarm.best_trial" in parents[0].data.tags
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"train.lr", "train.method", "train.device"} <= set(run.data.params)
        history = client.get_metric_history(run.info.run_id, "test_accuracy")
        assert [m.step for m in history] == [1]
        assert run.data.metrics["test_accuracy"] == history[0].value
        assert {"loss", "train_accuracy", "device_s", "device_calls"} <= set(run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "model"} <= artifacts
        model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        assert model == {"model/params.npz"}
    root = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"sweep_config.yaml", "device_pool.yaml"} <= root


def test_failed_trial_is_a_failed_run_with_the_error(ray_session, tmp_path, sqlite_uri):
    cfg = _config(tmp_path, device={"grid": ["osc", "broken"]})
    outcome = run_sweep(cfg, tracking_uri=sqlite_uri)
    status = {r.config["device"]: r for r in outcome.rows}
    assert status["osc"].status == "TERMINATED"
    assert status["broken"].status == "ERROR" and "fault" in status["broken"].error

    client = MlflowClient(sqlite_uri)
    _, children = _children(client, outcome)
    by_device = {r.data.params["train.device"]: r for r in children}
    assert by_device["osc"].info.status == "FINISHED"
    failed = by_device["broken"]
    assert failed.info.status == "FAILED"
    assert "DeviceError" in failed.data.tags["physfarm.error"]
    assert outcome.leaderboard()[0].config["device"] == "osc"
