"""End to end on a real Ray, real Tune and a real MLflow SQLite store: tiny sweeps."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from farm.config import parse_config
from farm.pool import find_device
from farm.sweep import run_sweep
from farm.tracking import PARENT_TAG
from trainers.registry import METHODS

OSC = {"name": "osc", "system": {"kind": "oscillators", "n": 16, "seed": 0}}
OSC2 = {"name": "osc2", "system": {"kind": "oscillators", "n": 16, "seed": 1}}
BROKEN = {"name": "broken", "system": {"kind": "oscillators", "n": 16, "fault_rate": 1.0}}


def _config(tmp_path, name: str, train: dict, sweep: dict | None = None, devices=(OSC, BROKEN)):
    return parse_config({
        "devices": [dict(d) for d in devices],
        "data": {"kind": "digits", "limit": 200},
        "train": {"method": "pat", "device": "osc", "epochs": 1, "batch_size": 32, "encoder": {"kind": "downsample", "size": [4, 4]},
                  **train},
        "sweep": {"name": name, "trial_cpus": 1, "storage_path": str(tmp_path / "ray_results"), **(sweep or {})},
        "tracking": {"experiment": name},
    })


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one costs seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _children(client, outcome):
    exp = client.get_experiment_by_name(outcome.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == outcome.parent_run_id]
    return parents, children


def _artifacts(client, run_id, folder=None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, folder)}


@pytest.mark.skipif("phyll" not in METHODS, reason="method phyll not registered")
def test_mixed_sweep_logs_everything_caps_devices_and_records_failures(ray_session, tmp_path, store):
    """PAT and PhyLL on three devices in one sweep (PAT's section picks its own devices), at most one
    trial at a time on 'osc', ASHA counting device seconds; one trial fails on a broken device."""
    train = {"method": {"grid": ["pat", "phyll"]}, "device": {"grid": ["osc", "osc2"]}, "epochs": 2,
             "pat": {"n_layers": 1, "device": {"grid": ["osc", "broken"]}},
             "phyll": {"n_blocks": 1, "train_eval_size": 0}}
    # 4 trial slots on 2 CPUs: without the cap, both 'osc' trials would start at once.
    sweep = {"max_trials_per_device": {"osc": 1}, "trial_cpus": 0.5,
             "scheduler": {"kind": "asha", "time_attr": "device_s", "max_t": 1000, "grace_period": 1000}}
    cfg = _config(tmp_path, "mix", train, sweep, devices=(OSC, OSC2, BROKEN))
    outcome = run_sweep(cfg, tracking_uri=store)

    rows = {(r.config["method"], r.config["device"]): r for r in outcome.rows}
    assert set(rows) == {("pat", "osc"), ("pat", "broken"), ("phyll", "osc"), ("phyll", "osc2")}
    bad = rows.pop(("pat", "broken"))
    assert bad.status == "ERROR" and "fault" in bad.error
    for r in rows.values():
        assert r.status == "TERMINATED" and r.metrics["epoch"] == 2, (r.status, r.error)
        assert 0.0 <= r.metrics["test_accuracy"] <= 1.0 and r.metrics["device_s_total"] > 0  # accounted at the actor
        assert 0.0 <= r.metrics["best_val_accuracy"] <= 1.0 and r.metrics["selected_epoch"] in (1, 2)
    assert outcome.leaderboard()[-1].status == "ERROR"
    assert find_device("osc") is None  # devices the sweep started are stopped at its end

    client = MlflowClient(store)
    parents, children = _children(client, outcome)
    assert [p.info.run_id for p in parents] == [outcome.parent_run_id]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["physfarm.best_trial"] == outcome.leaderboard()[0].trial_id
    assert parent.data.params["sweep.metric"] == "val_accuracy" and "best_val_accuracy" in parent.data.metrics
    best = outcome.leaderboard()[0]
    assert parent.data.metrics["best_val_accuracy"] == best.metrics["best_val_accuracy"]  # at its selected epoch
    assert parent.data.metrics["best_test_accuracy"] == best.metrics["test_accuracy"]
    assert {k for k in parent.data.metrics if k.startswith("best_")} <= {
        "best_val_accuracy", "best_test_accuracy", "best_selected_epoch", "best_device_s_total"}
    assert outcome.experiment_id == parent.info.experiment_id  # the printed UI link's experiment
    assert {"sweep_config.yaml", "device_pool.yaml", "leaderboard.json"} <= _artifacts(client, parent.info.run_id)

    assert len(children) == 4
    runs = {(r.data.tags["physfarm.method"], r.data.tags["physfarm.device"]): r for r in children}
    for (method, _device), run in runs.items():
        params = run.data.params  # the trial's resolved config, defaults included, only its method's fields
        assert params["train.method"] == method and {"train.lr", "train.device", "train.seed"} <= set(params)
        assert ("train.n_layers" in params and "train.twin.kind" in params) == (method == "pat")
        assert ("train.n_blocks" in params) == (method == "phyll")

    for key in (("pat", "osc"), ("phyll", "osc2")):
        run = runs[key]
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2]
        # test is measured once, after the last epoch, on the checkpoint chosen by validation
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [2]
        device_s = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "device_s_total"),
                                            key=lambda m: m.step)]
        assert 0 < device_s[0] < device_s[1]  # cumulative device seconds per epoch
        assert {"loss", "train_accuracy", "val_loss", "device_s_total", "queue_wait_s_total", "device_calls"} <= set(run.data.metrics)
        assert {"config.yaml", "model", "plots", "eval"} <= _artifacts(client, run.info.run_id)
        assert "model/params.npz" in _artifacts(client, run.info.run_id, "model")
        assert _artifacts(client, run.info.run_id, "plots") == {"plots/learning_curve.png",
                                                                  "plots/confusion_matrix.png"}
        local = Path(client.download_artifacts(run.info.run_id, "eval/predictions.npz", str(tmp_path / key[0])))
        with np.load(local) as pred:  # the confusion matrix's data agree with the reported accuracy
            assert np.isclose((pred["y_true"] == pred["y_pred"]).mean(), run.data.metrics["test_accuracy"])
    assert "model/twin.pt" in _artifacts(client, runs[("pat", "osc")].info.run_id, "model")
    png = Path(client.download_artifacts(runs[("pat", "osc")].info.run_id, "plots/learning_curve.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    failed = runs[("pat", "broken")]
    assert failed.info.status == "FAILED"
    assert "DeviceError" in failed.data.tags["physfarm.error"]
    assert "error.txt" in _artifacts(client, failed.info.run_id)

    # At most one trial at a time on 'osc' (a run spans its trial's start to its completion).
    spans = sorted((r.info.start_time, r.info.end_time) for (_, d), r in runs.items() if d == "osc")
    assert len(spans) == 2 and spans[1][0] >= spans[0][1], spans


def test_pbt_exploits_checkpoints(ray_session, tmp_path, store):
    cfg = _config(tmp_path, "pbt", {"lr": {"grid": [0.001, 0.05]}, "epochs": 2},
                  {"metric": "loss", "mode": "min",
                   "scheduler": {"kind": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5, "synch": True,
                                 "resample_probability": 0.0, "hyperparam_mutations": {"lr": [0.001, 0.05]}}},
                  devices=(OSC,))
    outcome = run_sweep(cfg, tracking_uri=store)
    assert len(outcome.rows) == 2 and all(r.status == "TERMINATED" for r in outcome.rows)
    assert all(r.metrics["epoch"] == 2 for r in outcome.rows)
    # PBT wrote its perturbations: the worse trial restarted from the better one's checkpoint.
    policy = (Path(outcome.path) / "pbt_global.txt").read_text().strip().splitlines()
    assert policy, "PBT never exploited"
    client = MlflowClient(store)
    _, children = _children(client, outcome)
    assert len(children) == 2  # a restarted trial keeps its run
    for run in children:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
        assert "hp.lr" in run.data.metrics  # the mutated value, per epoch


def test_local_ray_offers_the_cores_this_process_may_use():
    """Under `taskset -c 0` (or a batch scheduler's cpuset) a local sweep must not run two trials on one core."""
    import shutil
    import subprocess
    import sys

    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs taskset and at least 2 cores to pin a process to one of them")
    code = "from farm.sweep import usable_cpus; print(usable_cpus())"
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert pinned.stdout.strip() == "1", pinned.stderr
    from farm.sweep import usable_cpus

    assert usable_cpus() == len(os.sched_getaffinity(0))
