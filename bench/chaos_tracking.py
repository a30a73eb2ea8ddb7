"""Chaos scenarios for sweeps and their MLflow tracking, for the chaos bench (bench/chaos.py imports them).

Each function runs one scenario end to end in a fresh temp folder, with the `physfarm` CLI as a
subprocess (real Ray, Tune and MLflow), injects its fault, lets the sweep finish (resuming it where
the scenario says) and counts what reached MLflow:

    mlflow_down()     the MLflow server process group is SIGKILLed after the first epoch is logged,
                      kept down for outage_s, restarted on the same port and backend store
    worker_killed()   each trial's worker process is SIGKILLed once, after its first report
                      (sweep.max_failures retries it from its last checkpoint)
    sigkill_resume()  the sweep's own process is SIGKILLed after its first trial ended; --resume
    sigint_resume()   the same with SIGINT (Ctrl-C); --resume

Each returns {name, faults_injected, trials_expected, trials_finished, runs_expected, runs_complete,
lost_trials, lost_runs, lost_metrics, wall_s, details}; lost_metrics is the expected epoch points
(val_accuracy, one per trial and epoch) minus the distinct (run, step) points present in MLflow.
Sizes: oscillators n=16, digits limit 200, PAT (operating point named in `details`).

    python -m bench.chaos_tracking            # runs all four, prints their dicts as JSON
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .faults import MLflowServer

BIN = Path(sys.executable).parent
PHYSFARM = str(BIN / "physfarm")
JOURNAL = "mlflow_journal.jsonl"
TIMEOUT_S = 600


def _config(root: Path, name: str, uri: str, trials: int, epochs: int, tracking: dict | None = None,
            **sweep) -> Path:
    raw = {
        "devices": [{"name": "osc", "system": {"kind": "oscillators", "n": 16}}],
        "data": {"kind": "digits", "limit": 200},
        "train": {"method": "pat", "epochs": epochs, "batch_size": 32, "seed": {"grid": list(range(trials))},
                  "encoder": {"kind": "downsample", "size": [4, 4]}},
        "sweep": {"name": name, "trial_cpus": 1, "max_concurrent_trials": 1,
                  "storage_path": str(root / "ray_results"), **sweep},
        "tracking": {"uri": uri, "experiment": name, **(tracking or {})},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env() -> dict:
    return {**os.environ, "RAY_ADDRESS": "local"}  # never attach to another cluster on this machine


def _sweep(path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([PHYSFARM, "sweep", str(path), "--quiet", *extra], cwd=path.parent, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _query(db: Path, sql: str) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute(sql).fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:  # not created yet, or busy
        return 0


FINISHED_TRIALS = ("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid where t.key = "
                   "'physfarm.kind' and t.value = 'trial' and r.status = 'FINISHED'")
EPOCH_POINTS = "select count(*) from metrics where key = 'val_accuracy'"


def _wait(cond, proc: subprocess.Popen | None, what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the sweep exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s} s")
        time.sleep(0.2)


def _told(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("physfarm:")]


def count(uri: str, experiment: str, folder: Path, trials: int, epochs: int) -> dict:
    """What reached MLflow and Tune: the keys every scenario returns, less name/faults/wall_s."""
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=50_000) if exp else []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    by_trial: dict[str, list] = {}
    for r in children:
        by_trial.setdefault(r.data.tags.get("physfarm.trial_id"), []).append(r)
    present = repeated = complete = 0
    for tid, rs in by_trial.items():
        steps: list[int] = []
        for r in rs:
            steps += [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")]
        distinct = set(steps) & set(range(1, epochs + 1))
        present += len(distinct)
        repeated += len(steps) - len(set(steps))
        if any(r.info.status == "FINISHED" for r in rs) and len(distinct) == epochs:
            complete += 1
    try:
        statuses = [t.status for t in ExperimentAnalysis(str(folder)).trials]
    except Exception as err:  # noqa: BLE001 - no readable Tune state: nothing finished as far as Tune knows
        statuses = [f"unreadable: {err}"]
    finished = statuses.count("TERMINATED")
    return {
        "trials_expected": trials, "trials_finished": finished, "runs_expected": trials,
        "runs_complete": complete, "lost_trials": trials - finished, "lost_runs": trials - len(by_trial),
        "lost_metrics": trials * epochs - present,
        "details": {"parent_runs": len(parents), "parent_status": [p.info.status for p in parents],
                    "child_runs": len(children), "duplicated_runs": len(children) - len(by_trial),
                    "child_status": sorted(r.info.status for r in children),
                    "repeated_epoch_points": repeated, "tune_statuses": statuses,
                    "journal_left": (folder / JOURNAL).exists(),
                    "restarts": {r.data.tags.get("physfarm.trial_id"): r.data.tags.get("physfarm.restarts")
                                 for r in children if r.data.tags.get("physfarm.restarts")},
                    "operating_point": "pat, oscillators n=16, digits limit 200, batch 32, 1 trial at a time"},
    }


def mlflow_down(trials: int = 2, epochs: int = 3, outage_s: float = 5.0) -> dict:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chaos-mlflow-") as tmp:
        root = Path(tmp)
        server = MLflowServer(root / "server")
        server.start()
        try:
            # The end of the sweep waits for the restarted server (slow to start on a loaded machine).
            path = _config(root, "down", server.url, trials, epochs, tracking={"flush_wait_s": 300})
            folder = root / "ray_results" / "down"
            proc = _sweep(path)
            try:
                _wait(lambda: _query(server.db, EPOCH_POINTS) >= 1, proc, "first epoch logged")
                server.kill()
                down_at = time.monotonic()
                _wait(lambda: (folder / JOURNAL).exists(), proc, "write kept in the journal")
                time.sleep(max(0.0, outage_s - (time.monotonic() - down_at)))
                server.start()
                outage = time.monotonic() - down_at
                _, err = proc.communicate(timeout=TIMEOUT_S)
            finally:
                if proc.poll() is None:
                    proc.kill()
            replay = None
            if (folder / JOURNAL).exists():  # the sweep ended while the server was down: the report replays
                replay = subprocess.run([PHYSFARM, "report", "--tracking-uri", server.url, "--journal",
                                         str(folder / JOURNAL)], cwd=root, env=_env(), capture_output=True,
                                        text=True, timeout=TIMEOUT_S).returncode
            out = count(server.url, "down", folder, trials, epochs)
        finally:
            server.kill()
    out["details"].update(exit_code=proc.returncode, outage_s=round(outage, 2), told=_told(err),
                          report_replay_exit=replay)
    return {"name": "mlflow_down", "faults_injected": 1, **out, "wall_s": round(time.monotonic() - t0, 2)}


def worker_killed(trials: int = 2, epochs: int = 4) -> dict:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chaos-worker-") as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        path = _config(root, "wk", uri, trials, epochs, max_failures=2)
        folder = root / "ray_results" / "wk"
        proc = _sweep(path)
        killed: dict[str, int] = {}
        try:
            while proc.poll() is None:
                for result in folder.glob("*/result.json") if folder.exists() else []:
                    trial = result.parent.name
                    if trial in killed:
                        continue
                    lines = [ln for ln in result.read_text().splitlines() if ln.strip()]
                    try:
                        pid = int(json.loads(lines[0])["pid"]) if lines else None
                    except (ValueError, KeyError):
                        pid = None
                    if pid is not None:
                        try:
                            os.kill(pid, signal.SIGKILL)
                            killed[trial] = pid
                        except ProcessLookupError:  # already gone (the trial ended): no fault injected
                            killed[trial] = -1
                time.sleep(0.05)
            _, err = proc.communicate(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
        out = count(uri, "wk", folder, trials, epochs)
    faults = sum(1 for p in killed.values() if p > 0)
    out["details"].update(exit_code=proc.returncode, killed_pids=killed, told=_told(err)[-5:])
    return {"name": "worker_killed", "faults_injected": faults, **out, "wall_s": round(time.monotonic() - t0, 2)}


def _stop_and_resume(name: str, sig: int, trials: int, epochs: int) -> dict:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as tmp:
        root = Path(tmp)
        db = root / "mlflow.db"
        uri = f"sqlite:///{db}"
        path = _config(root, name, uri, trials, epochs)
        folder = root / "ray_results" / name
        proc = _sweep(path)
        try:
            _wait(lambda: _query(db, FINISHED_TRIALS) >= 1, proc, "first trial finished")
            finished_at_stop = _query(db, FINISHED_TRIALS)
            proc.send_signal(sig)
            _, err1 = proc.communicate(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
        resumed = _sweep(path, "--resume")
        _, err2 = resumed.communicate(timeout=TIMEOUT_S)
        out = count(uri, name, folder, trials, epochs)
    out["details"].update(stop_exit_code=proc.returncode, resume_exit_code=resumed.returncode,
                          finished_before_stop=finished_at_stop, told=_told(err1 + err2)[-5:])
    return {"name": name, "faults_injected": 1, **out, "wall_s": round(time.monotonic() - t0, 2)}


def sigkill_resume(trials: int = 3, epochs: int = 2) -> dict:
    return _stop_and_resume("sigkill_resume", signal.SIGKILL, trials, epochs)


def sigint_resume(trials: int = 3, epochs: int = 2) -> dict:
    return _stop_and_resume("sigint_resume", signal.SIGINT, trials, epochs)


SCENARIOS = {"mlflow_down": mlflow_down, "worker_killed": worker_killed, "sigkill_resume": sigkill_resume,
             "sigint_resume": sigint_resume}

if __name__ == "__main__":
    names = sys.argv[1:] or list(SCENARIOS)
    for n in names:
        print(json.dumps(SCENARIOS[n](), default=str), flush=True)
