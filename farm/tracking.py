"""MLflow tracking: one parent run per sweep, one child run per trial (`physfarm train`: one run).

Which store (resolve_tracking_uri, check_reachable), what a training's run holds (param_rows,
epoch_rows), and a sweep's runs: its parent run (SweepTracker) and each trial's child run (the Tune
callback MLflowCallback). The writes themselves, and how they survive an outage, are in
farm/mlflow_ops.py (through farm/journal.py); the tracker and the callback are handed the writer.

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
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import RunStatus
from ray import tune

from .device_facts import fact_tags
from .fidelity import fidelity_tags
from .journal import PLACEHOLDER
from .mlflow_ops import MlflowWriter, is_outage, sqlite_path  # noqa: F401 - sqlite_path: read here by report
from .tracking_uri import check_reachable, resolve_tracking_uri  # noqa: F401 - re-exported
from .runinfo import dataset_input, device_params, ended_by, pick, run_name

# Keys Tune adds to every result; they are bookkeeping, not training metrics.
TUNE_KEYS = {
    "timestamp", "time_this_iter_s", "time_total_s", "pid", "training_iteration", "done",
    "iterations_since_restore", "time_since_restore", "trial_id", "date", "hostname", "node_ip",
    "experiment_tag", "checkpoint_dir_name", "should_checkpoint", "config",
}
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "physfarm.trial_id"
SWEEP_TAG = "physfarm.sweep"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


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
def param_rows(config: dict) -> list[list[str]]:
    """A nested config as MLflow params, [[dotted key, value as text (cut at MLflow's 6000)], ...]."""
    return [[k, str(v)[:6000]] for k, v in flatten(config).items()]


# Figures a training reports every epoch that never change (sizes): params of the run, not flat charts.
CONSTANT_KEYS = ("n_physical_params", "n_digital_params", "n_weights", "hidden")


CONSTANT_TEXT = ("readout_outputs", "dead_outputs")  # what a trainer's calibration chose and found


def constant_params(result: dict) -> list[list[str]]:
    """A report's constant figures as params rows, [["model.<key>", value], ...]."""
    rows = [[f"model.{k}", str(int(result[k]))] for k in CONSTANT_KEYS
            if isinstance(result.get(k), (int, float)) and not isinstance(result.get(k), bool)]
    return rows + [[f"model.{k}", result[k]] for k in CONSTANT_TEXT if isinstance(result.get(k), str)]


def epoch_metrics(result: dict, extra: dict | None = None) -> dict[str, float]:
    """The numeric metrics of one epoch's report (the epoch itself is the step, not a metric; the
    constant sizes are params). Naming: a counter is per epoch unless its name ends in `_total`
    (the training's running total so far, e.g. device_s_total)."""
    values = {k: v for k, v in numeric_metrics(result).items() if k != "epoch" and k not in CONSTANT_KEYS}
    values.update(extra or {})
    return values


def epoch_rows(result: dict, step: int, extra: dict | None = None) -> list[list]:
    """One epoch's metrics as a log_batch write's rows, [[key, value, timestamp ms, step], ...]. The
    timestamp is taken now and kept with a journalled write, so a replayed point is the same point."""
    ts = int(time.time() * 1000)
    return [[k, v, ts, step] for k, v in epoch_metrics(result, extra).items()]


def context_tags(ctx: dict) -> dict:
    """Who ran it, from which code (MLflow's own tag names, so the UI shows them as such)."""
    tags = {"mlflow.user": ctx.get("user") or "unknown", "physfarm.version": ctx.get("version") or "unknown"}
    if ctx.get("git_commit"):
        tags["mlflow.source.git.commit"] = ctx["git_commit"]
    return tags


def run_devices(resolved: dict) -> list[str]:
    """The pool devices a training's config uses (one per layer where it names several)."""
    names = [resolved.get("device")] + [layer.get("device") for layer in resolved.get("layers") or []]
    return list(dict.fromkeys(n for n in names if n))


def log_run_facts(writer: MlflowWriter, run_id: str, resolved: dict, ctx: dict) -> None:
    """A training run's params (its resolved config, data, devices' system configs), config.yaml and
    its data set: everything to read the run without its sweep."""
    devices = run_devices(resolved)
    data = ctx.get("data") or {}
    params = param_rows({"train": resolved, "data": data})
    params += [[k, str(v)[:6000]] for k, v in device_params(ctx.get("systems") or {}, devices).items()]
    tags = [[k, v] for k, v in fact_tags(ctx.get("device_facts") or {}, devices).items()]
    writer.call("log_batch", run=run_id, params=params, tags=tags)
    systems = {n: (ctx.get("systems") or {}).get(n) for n in devices}
    writer.call("log_text", run=run_id, artifact_file="config.yaml",
                text=yaml.safe_dump({"train": resolved, "data": data, "devices": systems}, sort_keys=False))
    if data:
        writer.call("log_inputs", run=run_id, dataset=dataset_input(data))


def log_device_facts(writer: MlflowWriter, run_id: str, facts: dict[str, dict]) -> None:
    """What the devices reported when they started (farm.device_facts): tags, and devices.json whole."""
    if not any(facts.values()):
        return
    writer.call("log_batch", run=run_id, tags=[[k, v] for k, v in fact_tags(facts).items()])
    writer.call("log_text", run=run_id, artifact_file="devices.json", text=json.dumps(facts, indent=1))


def outcome_facts(resolved: dict, ctx: dict) -> dict:
    """What the outcome write needs to build the run's MLflow model."""
    if not ctx:
        return {}
    systems = ctx.get("systems") or {}
    return {"systems": {n: systems.get(n) for n in run_devices(resolved)}, "data": ctx.get("data") or {}}


# ----------------------------------------------------------------------------------------------------
# Sweeps: one parent run, one child run per trial
# ----------------------------------------------------------------------------------------------------
class SweepTracker:
    """The parent run of a sweep: created (or, on resume, reopened), finished with the best trial.

    Every write goes through the writer it is handed (farm.mlflow_ops.MlflowWriter, opened), so it
    survives a tracking outage: it is kept on disk and replayed when the store answers again."""

    def __init__(self, writer: MlflowWriter, experiment: str, sweep_name: str, context: dict | None = None):
        self.writer = writer
        self.context = dict(context or {})
        self.uri = writer.uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None

    def start(self, config: dict, devices: list[dict]) -> str:
        w = self.writer
        self.experiment_id = w.experiment(self.experiment)
        self.parent_run_id = w.call("create_run", experiment_id=self.experiment_id, run_name=self.sweep_name,
                                    tags={SWEEP_TAG: self.sweep_name, "physfarm.kind": "sweep",
                                          **context_tags(self.context)})
        w.call("log_batch", run=self.parent_run_id,
               params=param_rows({"sweep": config.get("sweep", {}), "data": config.get("data", {})}))
        w.call("log_text", run=self.parent_run_id, text=yaml.safe_dump(config, sort_keys=False),
               artifact_file="sweep_config.yaml")
        w.call("log_text", run=self.parent_run_id, text=yaml.safe_dump(devices, sort_keys=False),
               artifact_file="device_pool.yaml")
        return self.parent_run_id

    def resume(self, parent_run_id: str) -> str:
        """Reopen the parent run of an interrupted (or killed: left RUNNING) sweep; the same run goes on."""
        run = self.writer.client.get_run(parent_run_id)
        self.experiment_id = run.info.experiment_id
        self.parent_run_id = parent_run_id
        self.writer.call("update_run", run=parent_run_id, status="RUNNING")
        self.writer.call("set_tag", run=parent_run_id, key="physfarm.resumed",
                         value=str(int(run.data.tags.get("physfarm.resumed", "0")) + 1))
        return parent_run_id

    def children(self, status: str | None = None) -> list:
        parent = self.writer.resolve(self.parent_run_id)
        flt = f"tags.`{PARENT_TAG}` = '{parent}'"
        if status:
            flt += f" and attributes.status = '{status}'"
        return self.writer.client.search_runs([self.experiment_id], filter_string=flt, max_results=50_000)

    def interrupt(self) -> None:
        """The sweep stopped before its trials ended: the parent and its running children are KILLED
        (a resume sets them RUNNING again). While the store is down, the runs this process opened."""
        w = self.writer
        running = set(w.open_runs())
        if not w.pending:
            try:
                running |= {r.info.run_id for r in self.children("RUNNING")}
            except Exception as err:  # noqa: BLE001
                if not is_outage(err):
                    raise
        running = {w.resolve(r) for r in running} - {w.resolve(self.parent_run_id)}
        for run in sorted(running):
            w.call("set_terminated", run=run, status="KILLED")
        w.call("set_terminated", run=self.parent_run_id, status="KILLED")

    def finish(self, best: dict | None, status: str = "FINISHED", leaderboard: list[dict] | None = None,
               model_name: str | None = None) -> None:
        """End the parent run; with a best trial, tag it and register its model as a new version of
        `model_name` in the model registry."""
        w = self.writer
        if best:
            w.call("set_tag", run=self.parent_run_id, key="physfarm.best_trial", value=best["trial_id"])
            if best.get("run_id"):
                w.call("set_tag", run=self.parent_run_id, key="physfarm.best_run", value=best["run_id"])
                if model_name:
                    w.call("register_model", run=best["run_id"], name=model_name,
                           description=f"physfarm: the best trial of sweep '{self.sweep_name}' by validation",
                           tags={"physfarm.sweep": self.sweep_name, "physfarm.trial_id": best["trial_id"]})
            ts = int(time.time() * 1000)
            metrics = [[f"best_{k}", v, ts, 0] for k, v in numeric_metrics(best["metrics"]).items()]
            w.call("log_batch", run=self.parent_run_id, metrics=metrics)
        if leaderboard is not None:
            w.call("log_text", run=self.parent_run_id, text=json.dumps(leaderboard, indent=1, default=str),
                   artifact_file="leaderboard.json")
        w.call("set_terminated", run=self.parent_run_id, status=status)


class MLflowCallback(tune.Callback):
    """Tune callback writing each trial as a child run of the sweep's parent run.

    A trial's run is found again by its trial id tag, so a resumed sweep (or a trial PBT restarts, or
    one Tune retries after its worker died) keeps writing to the same run; nothing is duplicated. A
    run already FINISHED when this process first meets it (the sweep's process was killed after the
    trial ended but before Tune saved that) gets no further writes. All writes go through the writer
    it is handed (the sweep's, shared with its SweepTracker), so an MLflow outage neither stops
    training nor loses a write.

    Tune pickles the callback with its experiment state and, on a resume, unpickles it: the writer is
    not pickled: the restored callback writes through the writer this process has open on the sweep's
    folder (the resumed sweep's, MlflowWriter.for_folder), else one of its own there.
    """

    def __init__(self, writer: MlflowWriter, experiment_id: str, parent_run_id: str, sweep_name: str,
                 devices: list[str] | None = None, watch: list[str] | None = None, context: dict | None = None,
                 fidelity=None):
        self.uri = writer.uri
        self.fidelity = fidelity  # farm.fidelity.FidelityInfo: the multifidelity strategy's runs say their fidelities
        self.journal_dir = str(writer.folder)  # where a callback no one hands a writer opens its own
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self.devices = list(devices or [])
        self.watch = list(watch or [])  # train paths PBT mutates: logged as hp.<path> each epoch
        self.context = dict(context or {})  # farm.runinfo.run_context: data, systems, user, code, names
        self._writer: MlflowWriter | None = writer
        self._runs: dict[str, str] = {}
        self._done: set[str] = set()
        self._restarts: dict[str, int] = {}
        # Handed a parent run this sweep has just opened, no trial has a run yet: a trial's run is made
        # without first searching the store for it (a search per trial over a growing experiment).
        # Unpickled (a resume), every trial is looked up first.
        self._fresh = True

    @property
    def writer(self) -> MlflowWriter:
        if self._writer is None:
            # Unpickled by Tune (a resume): the resumed sweep's writer on this folder, or under Ray
            # Client, where Tune restores it in the cluster's process, one of its own. (A callback
            # pickled before the folder was recorded writes through a throwaway folder.)
            folder = self.journal_dir or tempfile.mkdtemp(prefix="physfarm-journal-")
            self._writer = MlflowWriter.for_folder(self.uri, folder)
        return self._writer

    def __getstate__(self):  # Tune pickles callbacks (experiment state); the writer holds a lock and a client
        state = dict(self.__dict__)
        state.update(_writer=None, _runs={}, _done=set(), _restarts={}, _fresh=False)
        return state

    def __setstate__(self, state):  # a sweep started by an older version may lack newer fields
        self.__dict__.update({"devices": [], "watch": [], "context": {}, "_writer": None, "_runs": {}, "fidelity": None,
                              "journal_dir": None,
                              "_done": set(), "_restarts": {}, "_fresh": False})
        self.__dict__.update({k: v for k, v in state.items() if k not in ("_client", "_mem")})  # older fields

    def _existing_run(self, trial_id: str):
        parent = self.writer.resolve(self.parent_run_id)
        runs = self.writer.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
            max_results=1,
        )
        return runs[0] if runs else None

    def run_id(self, trial) -> str:
        tid = trial.trial_id
        if tid not in self._runs:
            w = self.writer
            found = lookup_failed = None
            if self._fresh:  # a new sweep: nothing to find
                found = None
            elif not w.pending and not self.parent_run_id.startswith(PLACEHOLDER):
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
                    w.call("update_run", run=found.info.run_id, status="RUNNING")
                self._runs[tid] = found.info.run_id
            else:
                self._runs[tid] = self._create(trial, find=lookup_failed is not None)
            w.note_trial(tid, self._runs[tid])
        return self._runs[tid]

    def _resolved(self, trial) -> dict:
        from .fidelity import at_fidelity
        from .trainspec import resolve_train, resolved_config

        train = at_fidelity(dict(trial.config.get("train", {})), trial.config.get("fidelity"))
        try:
            return resolved_config(train, self.devices)
        except Exception:  # noqa: BLE001 - the trial reports the error itself
            return resolve_train(train, self.devices)

    def _create(self, trial, find: bool = False) -> str:
        resolved = self._resolved(trial)
        w = self.writer
        ctx = self.context
        tags = {PARENT_TAG: w.resolve(self.parent_run_id), TRIAL_TAG: trial.trial_id, SWEEP_TAG: self.sweep_name,
                "physfarm.kind": "trial", "physfarm.method": str(resolved.get("method", "")),
                "physfarm.device": str(resolved.get("device", "")), **context_tags(ctx),
                # a multifidelity run says its fidelity (and warm-start source) from the start, so that one
                # failing before its first result says it too; results then update the device seconds
                **fidelity_tags(self.fidelity, dict(trial.config.get("train", {})), {})}
        # While the store is down the run may exist already (a resumed trial): replay finds it by its tags.
        match = {PARENT_TAG: w.resolve(self.parent_run_id), TRIAL_TAG: trial.trial_id} if find else None
        name = run_name(resolved, ctx.get("name_keys") or [], trial.trial_id)
        run_id = w.call("create_run", experiment_id=self.experiment_id, run_name=name, tags=tags, match=match,
                        reopen=True)
        log_run_facts(w, run_id, resolved, ctx)
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_step_begin(self, iteration, trials, **info):
        self.writer.maybe_flush()  # an outage ends while no trial reports: replay anyway (backoff-limited)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_id(trial)
        if trial.trial_id in self._done:
            return
        if ended_by(result):
            return  # a recurring error's report: no epoch, nothing to chart (on_trial_complete records it)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        watched = {}
        for path in self.watch:
            value = pick(trial.config.get("train", {}), path)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                watched[f"hp.{path}"] = float(value)
        tags = [[k, v] for k, v in fidelity_tags(self.fidelity, dict(trial.config.get("train", {})), result).items()]
        self.writer.call("log_batch", run=run_id, metrics=epoch_rows(result, step, watched),
                         params=constant_params(result), **({"tags": tags} if tags else {}))

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The trial's worker failed or died and Tune retries it from its last checkpoint (max_failures):
        the same run goes on; the restarts are counted in the tag physfarm.restarts."""
        run_id = self.run_id(trial)
        if trial.trial_id in self._done:
            return
        self._restarts[trial.trial_id] = self._restarts.get(trial.trial_id, 0) + 1
        self.writer.call("set_tag", run=run_id, key="physfarm.restarts", value=str(self._restarts[trial.trial_id]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        if trial.trial_id in self._done:
            return
        error = ended_by(trial.last_result)
        if error:  # ended by a recurring error (farm.trainable.RECURRING): failed, not retried
            self.writer.call("failure", run=run_id, text=error + "\n")
            self.writer.call("outcome", run=run_id, folder=None, title=f"{self.sweep_name}/{trial.trial_id}")
            self.writer.call("set_terminated", run=run_id, status=RunStatus.to_string(RunStatus.FAILED))
            return
        checkpoint = trial.checkpoint
        folder = checkpoint.path if checkpoint is not None and checkpoint.path else None
        self.writer.call("outcome", run=run_id, folder=folder, title=f"{self.sweep_name}/{trial.trial_id}",
                         **outcome_facts(self._resolved(trial), self.context))
        self.writer.call("set_terminated", run=run_id, status=RunStatus.to_string(RunStatus.FINISHED))

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        if trial.trial_id in self._done:
            return
        self.writer.call("failure", run=run_id, text=_error_text(trial))
        self.writer.call("outcome", run=run_id, folder=None, title=f"{self.sweep_name}/{trial.trial_id}")
        self.writer.call("set_terminated", run=run_id, status=RunStatus.to_string(RunStatus.FAILED))


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
