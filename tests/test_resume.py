"""`physfarm sweep` stopped mid-way (SIGTERM, like Ctrl-C) and resumed: finished trials are not rerun,
the same MLflow parent run goes on, no child run is duplicated. Real Ray, Tune and MLflow (SQLite)."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from farm.cli import main
from farm.config import load_config
from farm.errors import ConfigError
from farm.sweep import check_resumable, read_marker, run_sweep
from farm.tracking import PARENT_TAG

from conftest import store_count, sweep_signalled_when

REPO = Path(__file__).resolve().parents[1]


def _finished_trials(db: Path) -> int:
    return store_count(db, "select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                           "where t.key = 'physfarm.kind' and t.value = 'trial' and r.status = 'FINISHED'")


def _sweep_stopped_after_first_trial(tmp_path, name: str, sig: int) -> tuple[Path, str, subprocess.Popen, str]:
    """Start `physfarm sweep` (3 one-at-a-time PAT trials) as a subprocess, send it `sig` once the
    first trial's run is FINISHED in MLflow, wait for it to end. Returns (config path, store URI,
    the ended process, its stderr)."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    raw = {
        "devices": [{"name": "osc", "system": {"kind": "oscillators", "n": 16}}],
        "data": {"kind": "digits", "limit": 200},
        "train": {"method": "pat", "epochs": 2, "batch_size": 32, "seed": {"grid": [0, 1, 2]},
                  "encoder": {"kind": "downsample", "size": [4, 4]}},
        "sweep": {"name": name, "trial_cpus": 1, "max_concurrent_trials": 1,
                  "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"uri": uri, "experiment": name},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc, err = sweep_signalled_when(path, tmp_path, lambda: _finished_trials(db) >= 1, sig, "no trial finished")
    return path, uri, proc, err


def test_interrupted_sweep_resumes_without_rerunning_or_duplicating(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "local")  # never attach to another cluster on this machine
    # SIGTERM is taken like Ctrl-C: Tune saves its state and stops.
    path, uri, proc, err = _sweep_stopped_after_first_trial(tmp_path, "res", signal.SIGTERM)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err.splitlines()[-1]

    folder = tmp_path / "ray_results" / "res"
    marker = read_marker(folder)
    assert marker["status"] == "interrupted"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("res")
    parent = client.get_run(marker["parent_run_id"])
    assert parent.info.status == "KILLED"
    before = {r.data.tags["physfarm.trial_id"]: r for r in client.search_runs([exp.experiment_id])
              if PARENT_TAG in r.data.tags}
    done_before = {t: r for t, r in before.items() if r.info.status == "FINISHED"}
    assert 1 <= len(done_before) < 3
    assert all(r.info.status in ("FINISHED", "KILLED") for r in before.values())

    cfg = load_config(path)
    with pytest.raises(ConfigError, match="did not finish.*--resume"):  # a new sweep would overwrite it
        check_resumable(cfg, uri, "res", resume=False)
    changed = load_config(path)
    changed.train["epochs"] = 3
    with pytest.raises(ConfigError, match="differs"):
        check_resumable(changed, uri, "res", resume=True)

    import ray

    try:
        outcome = run_sweep(cfg, resume=True)
    finally:
        ray.shutdown()
    _assert_resumed_once(client, "res", folder, marker, outcome, done_before)

    # The leaderboard, read back from MLflow.
    capsys.readouterr()
    assert main(["report", "--tracking-uri", uri, "--json"]) == 0
    board = json.loads(capsys.readouterr().out)
    assert board["parent_run_id"] == marker["parent_run_id"] and board["status"] == "FINISHED"
    assert [t["rank"] for t in board["trials"]] == [1, 2, 3]
    assert {t["params"]["seed"] for t in board["trials"]} == {"0", "1", "2"}
    accs = [t["metrics"]["best_val_accuracy"] for t in board["trials"]]
    assert accs == sorted(accs, reverse=True)  # ranked by validation, never by test
    assert all(0.0 <= t["metrics"]["test_accuracy"] <= 1.0 for t in board["trials"])  # shown beside it


def test_report_reads_the_leaderboard_back(tmp_path, capsys):
    """`physfarm report` on a store without a sweep says so (exit 1); with no store, a config error."""
    assert main(["report", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    db = tmp_path / "empty.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # an empty store
    assert main(["report", "--tracking-uri", f"sqlite:///{db}", "--experiment", "nope"]) == 1
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err


def _children(client: MlflowClient, experiment: str) -> tuple[list, list]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if PARENT_TAG not in r.data.tags], [r for r in runs if PARENT_TAG in r.data.tags]


def _assert_resumed_once(client: MlflowClient, experiment: str, folder: Path, marker: dict, outcome,
                         done_before: dict) -> None:
    """After --resume: the same parent run went on and finished, every trial has exactly one FINISHED
    child run with each epoch's point, and trials that had finished before the stop were not run again."""
    assert outcome.resumed and not outcome.interrupted
    assert outcome.parent_run_id == marker["parent_run_id"]
    assert len(outcome.rows) == 3 and all(r.status == "TERMINATED" for r in outcome.rows)
    assert read_marker(folder)["status"] == "finished"
    parents, children = _children(client, experiment)
    assert [p.info.run_id for p in parents] == [marker["parent_run_id"]]  # taken over, not a second one
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["physfarm.resumed"] == "1"
    assert all(r.data.tags[PARENT_TAG] == marker["parent_run_id"] for r in children)
    assert len(children) == 3 and len({r.data.tags["physfarm.trial_id"] for r in children}) == 3
    final = {r.trial_id: r.metrics["test_accuracy"] for r in outcome.rows}
    for run in children:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        # Each epoch once; an epoch that ended after the last saved checkpoint is redone on resume
        # and logged again at the same step (its newest value is the run's).
        assert sorted({m.step for m in history}) == [1, 2], history
        tid = run.data.tags["physfarm.trial_id"]
        assert run.data.metrics["test_accuracy"] == pytest.approx(final[tid])
        if tid in done_before:  # ended before the stop: not trained or written again
            assert [m.step for m in history] == [1, 2]
            assert run.info.run_id == done_before[tid].info.run_id
            assert run.info.end_time == done_before[tid].info.end_time


def test_sigkilled_sweep_resumes_without_losing_or_duplicating(tmp_path, monkeypatch):
    """SIGKILL gives the sweep no chance to clean up: its parent and running child runs stay RUNNING,
    its marker says running, Tune's saved state may lag behind. --resume takes them over."""
    monkeypatch.setenv("RAY_ADDRESS", "local")
    path, uri, proc, _ = _sweep_stopped_after_first_trial(tmp_path, "kill", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL

    folder = tmp_path / "ray_results" / "kill"
    marker = read_marker(folder)
    assert marker["status"] == "running"  # nobody wrote "interrupted"
    client = MlflowClient(uri)
    parents, before = _children(client, "kill")
    assert [p.info.status for p in parents] == ["RUNNING"]
    done_before = {r.data.tags["physfarm.trial_id"]: r for r in before if r.info.status == "FINISHED"}
    assert 1 <= len(done_before) < 3

    import ray

    try:
        outcome = run_sweep(load_config(path), resume=True)
    finally:
        ray.shutdown()
    _assert_resumed_once(client, "kill", folder, marker, outcome, done_before)


def _first_pid(folder: Path) -> int | None:
    """The pid of the first trial worker that has reported (Tune writes it into result.json)."""
    for result in sorted(folder.glob("*/result.json")):
        for line in result.read_text().splitlines():
            try:
                return int(json.loads(line)["pid"])
            except (ValueError, KeyError):
                continue
    return None


def test_killed_trial_worker_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """A trial's worker process is SIGKILLed after its first epoch: Tune (sweep.max_failures) restarts
    the trial from its last checkpoint, and its MLflow run stays one run that ends FINISHED."""
    import os
    import threading

    monkeypatch.setenv("RAY_ADDRESS", "local")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    epochs = 4
    raw = {
        "devices": [{"name": "osc", "system": {"kind": "oscillators", "n": 16}}],
        "data": {"kind": "digits", "limit": 200},
        "train": {"method": "pat", "epochs": epochs, "batch_size": 32, "seed": 0, "encoder": {"kind": "downsample", "size": [4, 4]}},
        "sweep": {"name": "wk", "trial_cpus": 1, "max_failures": 1, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"uri": uri, "experiment": "wk"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    folder = tmp_path / "ray_results" / "wk"
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set():
            pid = _first_pid(folder) if folder.exists() else None
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    import ray

    try:
        outcome = run_sweep(load_config(path))
    finally:
        stop.set()
        ray.shutdown()
    assert killed, "the trial's worker was never seen"
    assert len(outcome.rows) == 1 and outcome.rows[0].status == "TERMINATED", outcome.rows
    assert outcome.rows[0].metrics["epoch"] == epochs

    # Tune's own record: after the restart the iteration count goes on from the checkpoint, not from 0.
    lines = [json.loads(ln) for r in folder.glob("*/result.json") for ln in r.read_text().splitlines() if ln]
    pids = {ln["pid"] for ln in lines}
    assert killed[0] in pids and len(pids) == 2, pids  # a second worker finished the trial
    restarted = [ln for ln in lines if ln["pid"] != killed[0]]
    assert restarted[0]["iterations_since_restore"] == 1 and restarted[0]["epoch"] > 1, restarted[0]

    client = MlflowClient(uri)
    parents, children = _children(client, "wk")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].data.tags["physfarm.restarts"] == "1"
    history = client.get_metric_history(children[0].info.run_id, "val_accuracy")
    steps = [m.step for m in history]
    assert sorted(set(steps)) == list(range(1, epochs + 1)), steps
    assert steps.count(1) == 1, steps  # epoch 1 was not trained again
