"""MLflow tracking: one parent run per sweep, one child run per trial.

All MLflow writes happen in the driver (a Tune callback), so trials on any node need no access to
the tracking store, and a SQLite file has a single writer.
"""
from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

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


class SweepTracker:
    """The parent run of a sweep; creates it, and finishes it with the best trial."""

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
        params = {k: str(v)[:6000] for k, v in flatten({"sweep": config.get("sweep", {}),
                                                         "data": config.get("data", {})}).items()}
        self.client.log_batch(self.parent_run_id, params=[Param(k, v) for k, v in params.items()])
        self.client.log_text(self.parent_run_id, yaml.safe_dump(config, sort_keys=False), "sweep_config.yaml")
        self.client.log_text(self.parent_run_id, yaml.safe_dump(devices, sort_keys=False), "device_pool.yaml")
        return self.parent_run_id

    def finish(self, best: dict | None, status: str = "FINISHED") -> None:
        if best:
            self.client.set_tag(self.parent_run_id, "physfarm.best_trial", best["trial_id"])
            metrics = {f"best_{k}": v for k, v in numeric_metrics(best["metrics"]).items()}
            ts = int(time.time() * 1000)
            self.client.log_batch(self.parent_run_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()])
        self.client.set_terminated(self.parent_run_id, status)


class MLflowCallback(tune.Callback):
    """Tune callback writing each trial as a child run of the sweep's parent run."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, sweep_name: str):
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def __getstate__(self):  # Tune may pickle callbacks (experiment state); clients do not pickle
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    def _existing_run(self, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def run_id(self, trial) -> str:
        tid = trial.trial_id
        if tid not in self._runs:
            self._runs[tid] = self._existing_run(tid) or self._create(trial)
        return self._runs[tid]

    def _create(self, trial) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=f"{self.sweep_name}/{trial.trial_id}",
            tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id, SWEEP_TAG: self.sweep_name,
                  "physfarm.kind": "trial"},
        )
        run_id = run.info.run_id
        params = {k: str(v)[:6000] for k, v in flatten(trial.config).items()}
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        self.client.log_text(run_id, yaml.safe_dump(trial.config, sort_keys=False), "config.yaml")
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        ts = int(time.time() * 1000)
        metrics = [Metric(k, v, ts, step) for k, v in numeric_metrics(result).items() if k != "epoch"]
        if metrics:
            self.client.log_batch(self.run_id(trial), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        checkpoint = trial.checkpoint
        if checkpoint is not None and checkpoint.path and os.path.isdir(checkpoint.path):
            params = Path(checkpoint.path) / "params.npz"
            if params.exists():
                self.client.log_artifact(run_id, str(params), "model")
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        text = _error_text(trial)
        self.client.set_tag(run_id, "physfarm.error", text[-5000:])
        self.client.log_text(run_id, text, "error.txt")
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def _error_text(trial) -> str:
    for attr in ("error_file",):
        path = getattr(trial, attr, None)
        if path and os.path.exists(path):
            return Path(path).read_text()
    try:
        err = trial.get_error()
        if err is not None:
            return str(err)
    except Exception:  # noqa: BLE001 - best effort: the run is marked FAILED regardless
        pass
    return "trial failed (no error text recorded by Ray Tune)"
