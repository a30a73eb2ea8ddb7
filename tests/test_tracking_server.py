"""Tracking against a real `mlflow server` on loopback; an unreachable server is reported before
anything starts; `physfarm ui` serves the store on 127.0.0.1. Real Ray, Tune and MLflow."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from bench.faults import free_port, listening_addresses, wait_healthy
from farm.cli import main
from farm.config import parse_config
from farm.sweep import run_sweep
from farm.tracking import PARENT_TAG

PHYSFARM = str(Path(sys.executable).parent / "physfarm")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


SMALL = {
    "devices": [{"name": "osc", "system": {"kind": "oscillators", "n": 16}}],
    "data": {"kind": "digits", "limit": 200},
    "train": {"method": "pat", "epochs": 1, "batch_size": 32, "lr": {"grid": [0.01, 0.05]},
              "encoder": {"kind": "downsample", "size": [4, 4]}},
    "sweep": {"name": "srv", "trial_cpus": 1},
    "tracking": {"experiment": "srv"},
}


def test_unreachable_server_is_reported_before_anything_starts(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(SMALL))
    was_up = ray.is_initialized()
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for command in (["sweep", "c.yaml"], ["train", "c.yaml"]):
        code = main([*command, "--tracking-uri", url])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 3 and len(err) == 1, err
        assert err[0].startswith("physfarm: MLflow tracking server") and url in err[0] and "unreachable" in err[0]
    assert ray.is_initialized() == was_up  # no Ray started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no store, no Tune results


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow tracking server on a free loopback port with a SQLite backend, started the way
    users start it: `physfarm ui`, which becomes `mlflow ui` (MLflow's `server` command, serving and
    proxying artifacts) on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen([PHYSFARM, "ui", "--port", str(port), "--tracking-uri", f"sqlite:///{root / 'backend.db'}"],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, proc, port
    finally:
        stop(proc)


def test_ui_is_the_mlflow_server_on_loopback_only(server):
    url, proc, port = server
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    args = [a.decode() for a in cmdline if a]
    assert args[1].endswith("mlflow") and "ui" in args  # physfarm exec'd MLflow's server in place
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == str(port)
    assert listening_addresses(port) == {"127.0.0.1"}, "the MLflow UI must listen on 127.0.0.1 only"
    others = {ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for host in others:  # not reachable on the machine's other addresses
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex((host, port)) != 0, f"UI reachable on {host}"


def test_sweep_against_a_tracking_server(ray_session, server, tmp_path, capsys):
    server = server[0]
    raw = yaml.safe_load(yaml.safe_dump(SMALL))
    raw["sweep"]["storage_path"] = str(tmp_path / "ray_results")
    try:  # Optuna when installed (the optional extra): a search algorithm over ranges
        import optuna  # noqa: F401

        raw["train"]["lr"] = {"loguniform": [0.005, 0.05]}
        raw["sweep"].update(search="optuna", num_samples=2, seed=0)
    except ImportError:
        pass
    outcome = run_sweep(parse_config(raw), tracking_uri=server)
    assert outcome.tracking_uri == server
    assert len(outcome.rows) == 2 and all(r.status == "TERMINATED" for r in outcome.rows)
    assert all(0.005 <= r.config["lr"] <= 0.05 for r in outcome.rows)

    client = MlflowClient(server)
    exp = client.get_experiment_by_name("srv")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == outcome.parent_run_id]
    assert [p.info.run_id for p in parent] == [outcome.parent_run_id] and parent[0].info.status == "FINISHED"
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    for run in children:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1]
        # artifacts went through the server (proxied), not to a local path
        assert {"config.yaml", "model", "plots", "eval"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    local = client.download_artifacts(children[0].info.run_id, "plots/confusion_matrix.png", str(tmp_path))
    assert Path(local).read_bytes()[:4] == b"\x89PNG"

    capsys.readouterr()
    assert main(["report", "--tracking-uri", server, "--experiment", "srv", "--json"]) == 0
    board = json.loads(capsys.readouterr().out)
    assert board["sweep"] == "srv" and len(board["trials"]) == 2 and board["best_trial"] == board["trials"][0]["trial_id"]
    assert main(["report", "--tracking-uri", server]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("Sweep 'srv' (FINISHED)") and table[1].split()[:2] == ["rank", "trial"]
