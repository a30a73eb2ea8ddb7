"""The MLflow tracking server goes down mid-sweep and comes back: nothing is lost, nothing is
duplicated, the user is told. A real `mlflow server` process on loopback (killed, then restarted on
the same port with the same backend store), real Ray and Tune, the `physfarm` CLI as a subprocess."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from bench.faults import MLflowServer
from farm.cli import main
from farm.mlflow_ops import JOURNAL, MlflowWriter, limit_http_retries
from farm.tracking import PARENT_TAG

from conftest import store_count, wait_while_running

PHYSFARM = str(Path(sys.executable).parent / "physfarm")


@pytest.fixture
def server(tmp_path):
    srv = MLflowServer(tmp_path / "server")
    srv.start()
    yield srv
    srv.kill()


def test_journal_keeps_writes_while_the_server_is_down_and_replays_them_once(server, tmp_path):
    limit_http_retries()
    client = MlflowClient(server.url)
    exp = client.create_experiment("j")
    told = io.StringIO()
    j = MlflowWriter(server.url, tmp_path / "sweep", stream=told, retry_min_s=0.2).open()
    parent = j.call("create_run", experiment_id=exp, run_name="p", tags={"physfarm.kind": "sweep"})
    j.call("log_batch", run=parent, metrics=[["m", 1.0, 1000, 1]])
    assert not j.pending and not (tmp_path / "sweep" / JOURNAL).exists()

    server.kill()
    child = j.call("create_run", experiment_id=exp, run_name="c", tags={PARENT_TAG: parent})
    assert child.startswith("pending-")
    art = tmp_path / "note.txt"
    art.write_text("kept")
    for step in (2, 3):
        j.call("log_batch", run=parent, metrics=[["m", float(step), 1000 + step, step]])
        j.call("log_batch", run=child, metrics=[["m", 10.0 * step, 1000 + step, step]],
               params=[["p", "x"]], tags=[["t", "y"]])
    j.call("log_artifact", run=child, local_path=str(art), artifact_path="notes")
    art.unlink()  # the caller's file is gone; the journal kept a copy
    j.call("set_terminated", run=child, status="FINISHED")
    assert j.pending == 7 and (tmp_path / "sweep" / JOURNAL).exists()
    assert told.getvalue().count("unreachable") == 1 and str(tmp_path / "sweep" / JOURNAL) in told.getvalue()
    assert not j.flush()  # still down
    copy = tmp_path / "journal-copy"
    shutil.copytree(tmp_path / "sweep", copy)  # the journal and the files it keeps

    server.start()
    assert j.flush() and j.pending == 0
    assert "answers again; replayed 7" in told.getvalue()
    assert not (tmp_path / "sweep" / JOURNAL).exists()
    real = j.resolve(child)
    assert not real.startswith("pending-")

    # A crash between replaying and trimming the journal, even before the placeholder map was saved:
    # the same writes replayed again change nothing (the run is found by its write id).
    shutil.copytree(copy, tmp_path / "again")
    again = MlflowWriter(server.url, tmp_path / "again", stream=io.StringIO()).open()
    assert again.pending == 7 and again.flush()

    runs = client.search_runs([exp])
    assert sorted(r.info.run_name for r in runs) == ["c", "p"]  # no run created twice
    assert [(m.step, m.value) for m in client.get_metric_history(parent, "m")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(real, "m")] == [(2, 20.0), (3, 30.0)]
    run = client.get_run(real)
    assert run.info.status == "FINISHED" and run.data.params == {"p": "x"} and run.data.tags["t"] == "y"
    assert run.data.tags[PARENT_TAG] == parent
    local = client.download_artifacts(real, "notes/note.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "kept"


def _epoch_points(db: Path) -> int:
    return store_count(db, "select count(*) from metrics where key = 'val_accuracy'")


def test_server_killed_mid_sweep_and_restarted_loses_nothing(server, tmp_path):
    epochs, trials = 3, 2
    raw = {
        "devices": [{"name": "osc", "system": {"kind": "oscillators", "n": 16}}],
        "data": {"kind": "digits", "limit": 200},
        "train": {"method": "pat", "epochs": epochs, "batch_size": 32, "seed": {"grid": list(range(trials))},
                  "encoder": {"kind": "downsample", "size": [4, 4]}},
        "sweep": {"name": "down", "trial_cpus": 1, "max_concurrent_trials": 1,
                  "storage_path": str(tmp_path / "ray_results")},
        # The restart may take a while on a loaded machine: the sweep's end waits for it (then replays).
        "tracking": {"uri": server.url, "experiment": "down", "flush_wait_s": 240},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    journal = tmp_path / "ray_results" / "down" / JOURNAL
    env = {**os.environ, "RAY_ADDRESS": "local"}  # never attach to another cluster on this machine
    proc = subprocess.Popen([PHYSFARM, "sweep", str(path), "--quiet"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        # the first epoch reached MLflow
        wait_while_running(proc, lambda: _epoch_points(server.db) >= 1, deadline, "no epoch logged")
        server.kill()
        # the sweep goes on and keeps its writes
        wait_while_running(proc, journal.exists, deadline, "no write kept")
        server.start()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    told = [ln for ln in err.splitlines() if ln.startswith("physfarm: MLflow tracking store")]
    assert sum("unreachable (" in ln for ln in told) == 1, told  # told once when it went away
    assert any("answers again; replayed" in ln for ln in told), told
    assert not journal.exists()  # everything replayed at the end at the latest

    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("down")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parents[0].info.run_id]
    assert len(children) == trials and len(runs) == trials + 1  # no run lost or duplicated
    for run in children:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), history  # each epoch once
        assert {"config.yaml", "model", "plots", "eval"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert parents[0].data.tags.get("physfarm.best_run") in {c.info.run_id for c in children}


def test_report_replays_a_journal_left_by_a_sweep(server, tmp_path, capsys, monkeypatch):
    """The store was still down when the sweep ended: `physfarm report` replays the kept writes first."""
    limit_http_retries()
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(server.url)
    exp = client.create_experiment("left")
    folder = tmp_path / "ray_results" / "left"
    j = MlflowWriter(server.url, folder, stream=io.StringIO()).open()
    server.kill()
    parent = j.call("create_run", experiment_id=exp, run_name="left",
                    tags={"physfarm.kind": "sweep", "physfarm.sweep": "left"})
    child = j.call("create_run", experiment_id=exp, run_name="left/t1",
                   tags={PARENT_TAG: parent, "physfarm.trial_id": "t1", "physfarm.kind": "trial"})
    j.call("log_batch", run=child, metrics=[["val_accuracy", 0.5, 1000, 1], ["test_accuracy", 0.4, 1000, 1]],
           params=[["train.lr", "0.1"]])
    j.call("set_terminated", run=child, status="FINISHED")
    j.call("set_terminated", run=parent, status="FINISHED")
    assert j.pending == 5
    server.start()
    # report opens a writer of its own on the journal's folder and replays from disk, as a new process
    # would; the command as the sweep prints it: no --tracking-uri, the journal names its store
    capsys.readouterr()
    assert main(["report", "--journal", str(folder / JOURNAL), "--json"]) == 0
    captured = capsys.readouterr()
    board = json.loads(captured.out)
    assert board["sweep"] == "left" and board["status"] == "FINISHED"
    assert [t["trial_id"] for t in board["trials"]] == ["t1"] and board["trials"][0]["metrics"]["test_accuracy"] == 0.4
    assert "replayed 5" in captured.err
    assert not (folder / JOURNAL).exists()


def test_server_killed_mid_training_and_restarted_loses_nothing(server, tmp_path):
    """`physfarm train` writes through the same journal as a sweep: the training goes on while the
    server is down, the user is told once, and its one run ends up whole."""
    epochs = 6
    raw = {
        # Each device call really sleeps, so that epochs are still to come when the server is killed.
        "devices": [{"name": "osc", "system": {"kind": "oscillators", "n": 16, "latency_call_s": 0.05}}],
        "data": {"kind": "digits", "limit": 200},
        "train": {"method": "pat", "epochs": epochs, "batch_size": 32,
                  "encoder": {"kind": "downsample", "size": [4, 4]}},
        "sweep": {"name": "one", "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"uri": server.url, "experiment": "train-down", "flush_wait_s": 240},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen([PHYSFARM, "train", str(path), "--quiet"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while _epoch_points(server.db) < 1:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no epoch logged in time"
            time.sleep(0.2)
        server.kill()
        while not list((tmp_path / "ray_results").glob(f"train-*/{JOURNAL}")):  # writes kept on disk
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no write kept in time"
            time.sleep(0.2)
        server.start()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    told = [ln for ln in err.splitlines() if ln.startswith("physfarm: MLflow tracking store")]
    assert sum("unreachable (" in ln for ln in told) == 1, told
    assert any("answers again; replayed" in ln for ln in told), told
    assert not list((tmp_path / "ray_results").glob(f"train-*/{JOURNAL}"))  # replayed by the end

    client = MlflowClient(server.url)
    runs = client.search_runs([client.get_experiment_by_name("train-down").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert f"run {run_id}," in out  # the real id, not a placeholder
    history = client.get_metric_history(run_id, "val_accuracy")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1)), history
    assert {"config.yaml", "model", "plots", "eval"} <= {a.path for a in client.list_artifacts(run_id)}
