"""MLflow tracking: one parent run per sweep, one child run per trial (`physfarm train`: one run).

All MLflow writes happen in the driver (a Tune callback), so trials on any node need no access to
the tracking store, and a SQLite file has a single writer. A run holds: params (the trial's resolved
config), per-epoch metrics with the epoch as step, and artifacts: config.yaml, model/params.npz
(trained theta and digital weights), model/twin.pt (when the trainer has a twin),
eval/predictions.npz, plots/learning_curve.png and plots/confusion_matrix.png.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from ray import tune

from .errors import ConfigError

# Keys Tune adds to every result; they are bookkeeping, not training metrics.
TUNE_KEYS = {
    "timestamp", "time_this_iter_s", "time_total_s", "pid", "training_iteration", "done",
    "iterations_since_restore", "time_since_restore", "trial_id", "date", "hostname", "node_ip",
    "experiment_tag", "checkpoint_dir_name", "should_checkpoint", "config",
}
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "physfarm.trial_id"
SWEEP_TAG = "physfarm.sweep"


def resolve_tracking_uri(cli_uri: str | None = None, config_uri: str | None = None,
                         workdir: str | Path | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the config's, else ./mlflow.db as SQLite.

    SQLite paths are made absolute (MLflow 3 needs that); MLflow's file store is refused.
    """
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or config_uri
    base = Path(workdir or os.getcwd()).resolve()
    if not uri:
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith(("http://", "https://", "postgresql", "mysql", "mssql", "databricks")):
        return uri
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return f"sqlite:///{(base / path).resolve()}" if not path.startswith("/") else uri
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"tracking.uri: '{uri}' is a file store, which MLflow 3 refuses; use "
            f"'sqlite:///{base / 'mlflow.db'}' or an http:// tracking server"
        )
    raise ConfigError(f"tracking.uri: unsupported scheme in '{uri}'; use sqlite:////abs/path.db or http://host:port")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before any trial starts if an http tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(
            f"MLflow tracking server {uri} is unreachable ({err}); start it or pass another --tracking-uri"
        ) from None


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db = sqlite_path(uri)
    location = (db.parent / "mlartifacts" / name).as_uri() if db else None
    return client.create_experiment(name, artifact_location=location)


def numeric_metrics(result: dict) -> dict[str, float]:
    out = {}
    for k, v in result.items():
        if k in TUNE_KEYS or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[k] = float(v)
    return out



# ----------------------------------------------------------------------------------------------------
# One training run (a sweep's trial or `physfarm train`): the same params, metrics and artifacts
# ----------------------------------------------------------------------------------------------------
CURVE_METRICS = ("loss", "train_accuracy", "test_accuracy", "twin_error", "twin_probe_error")


def log_params(client: MlflowClient, run_id: str, config: dict) -> None:
    params = {k: str(v)[:6000] for k, v in flatten(config).items()}
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


def log_epoch(client: MlflowClient, run_id: str, result: dict, step: int, extra: dict | None = None) -> None:
    ts = int(time.time() * 1000)
    values = {k: v for k, v in numeric_metrics(result).items() if k != "epoch"}
    values.update(extra or {})
    metrics = [Metric(k, v, ts, step) for k, v in values.items()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def log_outcome(client: MlflowClient, run_id: str, checkpoint_dir: str | Path | None, title: str) -> None:
    """Artifacts of a finished (or failed) training: trained parameters and twin (model/), test
    predictions (eval/), learning curve and confusion matrix (plots/). Best effort: a missing piece
    is skipped, never fails the run."""
    from . import plots

    folder = Path(checkpoint_dir) if checkpoint_dir else None
    if folder is not None and folder.is_dir():
        for name in ("params.npz", "twin.pt"):
            if (folder / name).exists():
                client.log_artifact(run_id, str(folder / name), "model")
        if (folder / "predictions.npz").exists():
            client.log_artifact(run_id, str(folder / "predictions.npz"), "eval")
    with tempfile.TemporaryDirectory() as tmp:
        series = {}
        for key in CURVE_METRICS:
            try:
                history = client.get_metric_history(run_id, key)
            except Exception:  # noqa: BLE001 - a store without that metric
                history = []
            if history:  # an epoch redone after a restore is logged again: its latest value counts
                latest = {m.step: m for m in sorted(history, key=lambda m: (m.step, m.timestamp))}
                series[key] = [(step, m.value) for step, m in sorted(latest.items())]
        if series:
            path = Path(tmp) / "learning_curve.png"
            plots.learning_curve(series, path, title)
            client.log_artifact(run_id, str(path), "plots")
        if folder is not None and (folder / "predictions.npz").exists():
            with np.load(folder / "predictions.npz") as pred:
                y_true, y_pred = pred["y_true"], pred["y_pred"]
            path = Path(tmp) / "confusion_matrix.png"
            plots.confusion_matrix(y_true, y_pred, path, title)
            client.log_artifact(run_id, str(path), "plots")


def log_failure(client: MlflowClient, run_id: str, text: str) -> None:
    client.set_tag(run_id, "physfarm.error", text[-5000:])
    client.log_text(run_id, text, "error.txt")


# ----------------------------------------------------------------------------------------------------
# Sweeps: one parent run, one child run per trial
# ----------------------------------------------------------------------------------------------------
class SweepTracker:
    """The parent run of a sweep: created (or, on resume, reopened), finished with the best trial."""

    def __init__(self, uri: str, experiment: str, sweep_name: str):
        self.uri = uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None

    def start(self, config: dict, devices: list[dict]) -> str:
        self.experiment_id = get_or_create_experiment(self.client, self.experiment, self.uri)
        run = self.client.create_run(self.experiment_id, run_name=self.sweep_name,
                                     tags={SWEEP_TAG: self.sweep_name, "physfarm.kind": "sweep"})
        self.parent_run_id = run.info.run_id
        log_params(self.client, self.parent_run_id,
                   {"sweep": config.get("sweep", {}), "data": config.get("data", {})})
        self.client.log_text(self.parent_run_id, yaml.safe_dump(config, sort_keys=False), "sweep_config.yaml")
        self.client.log_text(self.parent_run_id, yaml.safe_dump(devices, sort_keys=False), "device_pool.yaml")
        return self.parent_run_id

    def resume(self, parent_run_id: str) -> str:
        """Reopen the parent run of an interrupted sweep (the same run continues)."""
        run = self.client.get_run(parent_run_id)
        self.experiment_id = run.info.experiment_id
        self.parent_run_id = parent_run_id
        self.client.update_run(parent_run_id, status="RUNNING")
        self.client.set_tag(parent_run_id, "physfarm.resumed",
                            str(int(run.data.tags.get("physfarm.resumed", "0")) + 1))
        return parent_run_id

    def children(self, status: str | None = None) -> list:
        flt = f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'"
        if status:
            flt += f" and attributes.status = '{status}'"
        return self.client.search_runs([self.experiment_id], filter_string=flt, max_results=50_000)

    def interrupt(self) -> None:
        """The sweep stopped before its trials ended: the parent and its running children are KILLED
        (a resume sets them RUNNING again)."""
        for run in self.children("RUNNING"):
            self.client.set_terminated(run.info.run_id, "KILLED")
        self.client.set_terminated(self.parent_run_id, "KILLED")

    def finish(self, best: dict | None, status: str = "FINISHED", leaderboard: list[dict] | None = None) -> None:
        if best:
            self.client.set_tag(self.parent_run_id, "physfarm.best_trial", best["trial_id"])
            if best.get("run_id"):
                self.client.set_tag(self.parent_run_id, "physfarm.best_run", best["run_id"])
            metrics = {f"best_{k}": v for k, v in numeric_metrics(best["metrics"]).items()}
            ts = int(time.time() * 1000)
            self.client.log_batch(self.parent_run_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()])
        if leaderboard is not None:
            self.client.log_text(self.parent_run_id, json.dumps(leaderboard, indent=1, default=str),
                                 "leaderboard.json")
        self.client.set_terminated(self.parent_run_id, status)


class MLflowCallback(tune.Callback):
    """Tune callback writing each trial as a child run of the sweep's parent run.

    A trial's run is found again by its trial id tag, so a resumed sweep (or a trial PBT restarts)
    keeps writing to the same run; nothing is duplicated.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, sweep_name: str,
                 devices: list[str] | None = None, watch: list[str] | None = None):
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self.devices = list(devices or [])
        self.watch = list(watch or [])  # train paths PBT mutates: logged as hp.<path> each epoch
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def __getstate__(self):  # Tune pickles callbacks (experiment state); clients do not pickle
        state = dict(self.__dict__)
        state["_client"] = None
        state["_runs"] = {}
        return state

    def __setstate__(self, state):  # a sweep started by an older version may lack newer fields
        self.__dict__.update({"devices": [], "watch": [], "_client": None, "_runs": {}})
        self.__dict__.update(state)

    def _existing_run(self, trial_id: str):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
            max_results=1,
        )
        return runs[0] if runs else None

    def run_id(self, trial) -> str:
        tid = trial.trial_id
        if tid not in self._runs:
            found = self._existing_run(tid)
            if found is not None:
                if found.info.status != "RUNNING":  # resumed: the same run goes on
                    self.client.update_run(found.info.run_id, status="RUNNING")
                self._runs[tid] = found.info.run_id
            else:
                self._runs[tid] = self._create(trial)
        return self._runs[tid]

    def _resolved(self, trial) -> dict:
        from .trainspec import resolve_train, resolved_config

        train = dict(trial.config.get("train", {}))
        try:
            return resolved_config(train, self.devices)
        except Exception:  # noqa: BLE001 - the trial reports the error itself
            return resolve_train(train, self.devices)

    def _create(self, trial) -> str:
        resolved = self._resolved(trial)
        run = self.client.create_run(
            self.experiment_id, run_name=f"{self.sweep_name}/{trial.trial_id}",
            tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id, SWEEP_TAG: self.sweep_name,
                  "physfarm.kind": "trial", "physfarm.method": str(resolved.get("method", "")),
                  "physfarm.device": str(resolved.get("device", ""))},
        )
        run_id = run.info.run_id
        log_params(self.client, run_id, {"train": resolved})
        self.client.log_text(run_id, yaml.safe_dump({"train": resolved}, sort_keys=False), "config.yaml")
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        extra = {}
        for path in self.watch:
            value = _pick(trial.config.get("train", {}), path)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                extra[f"hp.{path}"] = float(value)
        log_epoch(self.client, self.run_id(trial), result, step, extra)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        checkpoint = trial.checkpoint
        folder = checkpoint.path if checkpoint is not None and checkpoint.path else None
        try:
            log_outcome(self.client, run_id, folder, f"{self.sweep_name}/{trial.trial_id}")
        finally:
            self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        log_failure(self.client, run_id, _error_text(trial))
        try:
            log_outcome(self.client, run_id, None, f"{self.sweep_name}/{trial.trial_id}")
        finally:
            self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def _pick(node: dict, path: str):
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()
    try:
        err = trial.get_error()
        if err is not None:
            return str(err)
    except Exception:  # noqa: BLE001 - best effort: the run is marked FAILED regardless
        pass
    return "trial failed (no error text recorded by Ray Tune)"
