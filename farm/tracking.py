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
CURVE_METRICS = ("loss", "val_loss", "train_accuracy", "val_accuracy", "twin_error", "twin_probe_error")


def param_rows(config: dict) -> list[list[str]]:
    """A nested config as MLflow params, [[dotted key, value as text (cut at MLflow's 6000)], ...]."""
    return [[k, str(v)[:6000]] for k, v in flatten(config).items()]


def epoch_metrics(result: dict, extra: dict | None = None) -> dict[str, float]:
    """The numeric metrics of one epoch's report (the epoch itself is the step, not a metric)."""
    values = {k: v for k, v in numeric_metrics(result).items() if k != "epoch"}
    values.update(extra or {})
    return values


def sweep_journal(owner):
    """The journal an owner's MLflow writes go through (farm.journal): the sweep folder's, shared in
    this process, or without a folder (`owner.journal_dir` None: a callback pickled by an older
    version, a tracker used alone) a throwaway one that keeps nothing on disk, cached on the owner.
    `owner` has uri, journal_dir and client."""
    from .journal import TrackingJournal, journal_for

    if owner.journal_dir is not None:
        return journal_for(owner.uri, owner.journal_dir)
    if getattr(owner, "_mem", None) is None:
        owner._mem = TrackingJournal(owner.uri, tempfile.mkdtemp(prefix="physfarm-journal-"), owner.client)
    return owner._mem


def log_params(client: MlflowClient, run_id: str, config: dict) -> None:
    items = [Param(k, v) for k, v in param_rows(config)]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


def log_epoch(client: MlflowClient, run_id: str, result: dict, step: int, extra: dict | None = None) -> None:
    ts = int(time.time() * 1000)
    metrics = [Metric(k, v, ts, step) for k, v in epoch_metrics(result, extra).items()]
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
            except Exception as err:  # noqa: BLE001 - a store without that metric
                from .journal import is_outage

                if is_outage(err):  # the store is down: the journal retries the whole outcome
                    raise
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
    """The parent run of a sweep: created (or, on resume, reopened), finished with the best trial.

    With a journal (see farm.journal), every write survives a tracking outage: it is kept on disk and
    replayed when the store answers again."""

    def __init__(self, uri: str, experiment: str, sweep_name: str, journal_dir: str | Path | None = None):
        self.uri = uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.journal_dir = str(journal_dir) if journal_dir is not None else None

    @property
    def journal(self):
        return sweep_journal(self)

    def start(self, config: dict, devices: list[dict]) -> str:
        self.experiment_id = get_or_create_experiment(self.client, self.experiment, self.uri)
        j = self.journal
        self.parent_run_id = j.call("create_run", experiment_id=self.experiment_id, run_name=self.sweep_name,
                                    tags={SWEEP_TAG: self.sweep_name, "physfarm.kind": "sweep"})
        j.call("log_batch", run=self.parent_run_id,
               params=param_rows({"sweep": config.get("sweep", {}), "data": config.get("data", {})}))
        j.call("log_text", run=self.parent_run_id, text=yaml.safe_dump(config, sort_keys=False),
               artifact_file="sweep_config.yaml")
        j.call("log_text", run=self.parent_run_id, text=yaml.safe_dump(devices, sort_keys=False),
               artifact_file="device_pool.yaml")
        return self.parent_run_id

    def resume(self, parent_run_id: str) -> str:
        """Reopen the parent run of an interrupted (or killed: left RUNNING) sweep; the same run goes on."""
        run = self.client.get_run(parent_run_id)
        self.experiment_id = run.info.experiment_id
        self.parent_run_id = parent_run_id
        self.journal.call("update_run", run=parent_run_id, status="RUNNING")
        self.journal.call("set_tag", run=parent_run_id, key="physfarm.resumed",
                          value=str(int(run.data.tags.get("physfarm.resumed", "0")) + 1))
        return parent_run_id

    def children(self, status: str | None = None) -> list:
        parent = self.journal.resolve(self.parent_run_id)
        flt = f"tags.`{PARENT_TAG}` = '{parent}'"
        if status:
            flt += f" and attributes.status = '{status}'"
        return self.client.search_runs([self.experiment_id], filter_string=flt, max_results=50_000)

    def interrupt(self) -> None:
        """The sweep stopped before its trials ended: the parent and its running children are KILLED
        (a resume sets them RUNNING again). While the store is down, the runs this process opened."""
        from .journal import is_outage

        j = self.journal
        running = set(j.open_runs())
        if not j.pending:
            try:
                running |= {r.info.run_id for r in self.children("RUNNING")}
            except Exception as err:  # noqa: BLE001
                if not is_outage(err):
                    raise
        running = {j.resolve(r) for r in running} - {j.resolve(self.parent_run_id)}
        for run in sorted(running):
            j.call("set_terminated", run=run, status="KILLED")
        j.call("set_terminated", run=self.parent_run_id, status="KILLED")

    def finish(self, best: dict | None, status: str = "FINISHED", leaderboard: list[dict] | None = None) -> None:
        j = self.journal
        if best:
            j.call("set_tag", run=self.parent_run_id, key="physfarm.best_trial", value=best["trial_id"])
            if best.get("run_id"):
                j.call("set_tag", run=self.parent_run_id, key="physfarm.best_run", value=best["run_id"])
            ts = int(time.time() * 1000)
            metrics = [[f"best_{k}", v, ts, 0] for k, v in numeric_metrics(best["metrics"]).items()]
            j.call("log_batch", run=self.parent_run_id, metrics=metrics)
        if leaderboard is not None:
            j.call("log_text", run=self.parent_run_id, text=json.dumps(leaderboard, indent=1, default=str),
                   artifact_file="leaderboard.json")
        j.call("set_terminated", run=self.parent_run_id, status=status)


class MLflowCallback(tune.Callback):
    """Tune callback writing each trial as a child run of the sweep's parent run.

    A trial's run is found again by its trial id tag, so a resumed sweep (or a trial PBT restarts, or
    one Tune retries after its worker died) keeps writing to the same run; nothing is duplicated. A
    run already FINISHED when this process first meets it (the sweep's process was killed after the
    trial ended but before Tune saved that) gets no further writes. All writes go through the sweep's
    journal, so an MLflow outage neither stops training nor loses a write.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, sweep_name: str,
                 devices: list[str] | None = None, watch: list[str] | None = None,
                 journal_dir: str | Path | None = None):
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self.devices = list(devices or [])
        self.watch = list(watch or [])  # train paths PBT mutates: logged as hp.<path> each epoch
        self.journal_dir = str(journal_dir) if journal_dir is not None else None
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}
        self._done: set[str] = set()
        self._restarts: dict[str, int] = {}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def journal(self):
        return sweep_journal(self)

    def __getstate__(self):  # Tune pickles callbacks (experiment state); clients do not pickle
        state = dict(self.__dict__)
        state.update(_client=None, _runs={}, _done=set(), _restarts={}, _mem=None)
        return state

    def __setstate__(self, state):  # a sweep started by an older version may lack newer fields
        self.__dict__.update({"devices": [], "watch": [], "_client": None, "_runs": {}, "journal_dir": None,
                              "_done": set(), "_restarts": {}, "_mem": None})
        self.__dict__.update(state)

    def _existing_run(self, trial_id: str):
        parent = self.journal.resolve(self.parent_run_id)
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
            max_results=1,
        )
        return runs[0] if runs else None

    def run_id(self, trial) -> str:
        from .journal import PLACEHOLDER, is_outage

        tid = trial.trial_id
        if tid not in self._runs:
            j = self.journal
            found = lookup_failed = None
            if not j.pending and not self.parent_run_id.startswith(PLACEHOLDER):
                try:
                    found = self._existing_run(tid)
                except Exception as err:  # noqa: BLE001 - the store is down: find-or-create on replay
                    if not is_outage(err):
                        raise
                    lookup_failed = err
            else:
                lookup_failed = True
            if found is not None:
                if found.info.status == "FINISHED":  # ended before this process started: leave it as it is
                    self._done.add(tid)
                else:  # resumed: the same run goes on
                    j.call("update_run", run=found.info.run_id, status="RUNNING")
                self._runs[tid] = found.info.run_id
            else:
                self._runs[tid] = self._create(trial, find=lookup_failed is not None)
            j.note_trial(tid, self._runs[tid])
        return self._runs[tid]

    def _resolved(self, trial) -> dict:
        from .trainspec import resolve_train, resolved_config

        train = dict(trial.config.get("train", {}))
        try:
            return resolved_config(train, self.devices)
        except Exception:  # noqa: BLE001 - the trial reports the error itself
            return resolve_train(train, self.devices)

    def _create(self, trial, find: bool = False) -> str:
        resolved = self._resolved(trial)
        j = self.journal
        tags = {PARENT_TAG: j.resolve(self.parent_run_id), TRIAL_TAG: trial.trial_id, SWEEP_TAG: self.sweep_name,
                "physfarm.kind": "trial", "physfarm.method": str(resolved.get("method", "")),
                "physfarm.device": str(resolved.get("device", ""))}
        # While the store is down the run may exist already (a resumed trial): replay finds it by its tags.
        match = {PARENT_TAG: j.resolve(self.parent_run_id), TRIAL_TAG: trial.trial_id} if find else None
        run_id = j.call("create_run", experiment_id=self.experiment_id, run_name=f"{self.sweep_name}/{trial.trial_id}",
                        tags=tags, match=match, reopen=True)
        j.call("log_batch", run=run_id, params=param_rows({"train": resolved}))
        j.call("log_text", run=run_id, text=yaml.safe_dump({"train": resolved}, sort_keys=False),
               artifact_file="config.yaml")
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_step_begin(self, iteration, trials, **info):
        self.journal.maybe_flush()  # an outage ends while no trial reports: replay anyway (backoff-limited)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_id(trial)
        if trial.trial_id in self._done:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        watched = {}
        for path in self.watch:
            value = _pick(trial.config.get("train", {}), path)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                watched[f"hp.{path}"] = float(value)
        ts = int(time.time() * 1000)  # ms, kept in the journal: a replayed point is the same point
        self.journal.call("log_batch", run=run_id,
                          metrics=[[k, v, ts, step] for k, v in epoch_metrics(result, watched).items()])

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The trial's worker failed or died and Tune retries it from its last checkpoint (max_failures):
        the same run goes on; the restarts are counted in the tag physfarm.restarts."""
        run_id = self.run_id(trial)
        if trial.trial_id in self._done:
            return
        self._restarts[trial.trial_id] = self._restarts.get(trial.trial_id, 0) + 1
        self.journal.call("set_tag", run=run_id, key="physfarm.restarts", value=str(self._restarts[trial.trial_id]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        if trial.trial_id in self._done:
            return
        checkpoint = trial.checkpoint
        folder = checkpoint.path if checkpoint is not None and checkpoint.path else None
        self.journal.call("outcome", run=run_id, folder=folder, title=f"{self.sweep_name}/{trial.trial_id}")
        self.journal.call("set_terminated", run=run_id, status=RunStatus.to_string(RunStatus.FINISHED))

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        if trial.trial_id in self._done:
            return
        self.journal.call("failure", run=run_id, text=_error_text(trial))
        self.journal.call("outcome", run=run_id, folder=None, title=f"{self.sweep_name}/{trial.trial_id}")
        self.journal.call("set_terminated", run=run_id, status=RunStatus.to_string(RunStatus.FAILED))


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
