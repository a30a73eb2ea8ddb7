"""Every MLflow write physfarm makes, and how an outage is told from a refusal.

`MlflowWriter` is what `physfarm sweep` (its tracker and Tune callback, farm/tracking.py) and `physfarm
train` write through: each write is a named op (`OPS`) applied by `MlflowOps` through a farm.journal
`Journal` in a folder of the caller's (a sweep's Tune folder), so a write the store cannot take now is
kept on disk (`mlflow_journal.jsonl`) and replayed in order when it answers (see farm/journal.py).

The ops and why each is idempotent when replayed:
  - create_run: a run created during an outage has a placeholder id; its replay is a find-or-create
    (by the trial's tags when given as `match`, else by the unique `physfarm.write_id` tag), and the
    journal maps the placeholder to the run (`mlflow_journal_refs.json`);
  - log_batch: metrics carry the timestamp they were taken at, and MLflow's store skips an identical
    metric point; params and tags are overwritten with the same values;
  - set_terminated, update_run, set_tag, log_text, log_artifact, failure: overwrite with the same
    values (an artifact at the same path);
  - outcome: a finished training's artifacts (model, predictions, plots), drawn again from the store.

Also here: experiments (not journalled: a sweep or a training needs its id before it starts), where a
SQLite store keeps its artifacts, and MLflow's HTTP retries lowered so a down server holds the caller
seconds, not minutes.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE
from mlflow.tracking import MlflowClient

from .journal import PLACEHOLDER, Journal, read_header

# MLflow draws a progress bar for every artifact it reads (building a trial's model validates its
# input example): dozens of lines in a sweep's console. Off unless the user asks for it.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

JOURNAL_NAME = "mlflow_journal"
JOURNAL = JOURNAL_NAME + ".jsonl"
WRITE_ID_TAG = "physfarm.write_id"
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_FILES = ("params.npz", "twin.pt", "predictions.npz", "state.pt", "model_inputs.npz")  # what a training's outcome reads
CURVE_METRICS = ("loss", "val_loss", "train_accuracy", "val_accuracy", "twin_error", "twin_probe_error")

# MLflow error codes that mean "the store could not do it now" (retry later), as opposed to a
# request the store refuses (bad value), which would fail the same way on every retry.
OUTAGE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
                "SERVICE_UNDER_MAINTENANCE", "ABORTED", "IO_ERROR", "BAD_REQUEST_TIMEOUT"}


def is_outage(err: BaseException) -> bool:
    """Did the write fail because the store is unreachable or erroring (not because it was refused)?"""
    if isinstance(err, MlflowException):
        return err.error_code in OUTAGE_CODES
    if isinstance(err, (OSError, TimeoutError)):  # connection refused/reset, timeouts (requests' are OSErrors)
        return True
    try:
        from sqlalchemy.exc import DBAPIError
    except ImportError:  # pragma: no cover - MLflow's SQL stores need sqlalchemy
        return False
    return isinstance(err, DBAPIError)  # a locked or unreachable database


def limit_http_retries() -> None:
    """MLflow's own HTTP retries (7 by default, backoff doubling from 2 s) would hold the caller (Tune's
    driver loop, a training's epochs) for minutes per write while a server is down; the journal retries
    instead. A user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def reachable(uri: str, timeout_s: float = 3.0) -> bool:
    """Does an http tracking server answer /health? A database store: True (the write itself tells)."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def tracking_uri_scope(uri: str):
    """MLflow's fluent API (load_model of a `models:/` or `runs:/` URI) pointed at `uri` for the block
    only: mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which every later subprocess and
    sweep of this process would inherit and write to."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: back to "not set", which unsets the variable too


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id; a new experiment on a SQLite store keeps its artifacts beside the database
    (`mlartifacts/<name>`)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        return exp.experiment_id
    db = sqlite_path(uri)
    location = (db.parent / "mlartifacts" / name).as_uri() if db else None
    # Model training, not GenAI: the MLflow UI opens such an experiment on its runs and models.
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: "custom_model_development"})


def log_outcome(client: MlflowClient, run_id: str, checkpoint_dir: str | Path | None, title: str,
                systems: dict | None = None, data: dict | None = None) -> None:
    """Artifacts of a finished (or failed) training: the trained network as an MLflow model with its
    parameters and twin (model/), test predictions (eval/), learning curve and confusion matrix
    (plots/). A missing piece is skipped; an outage is raised (the journal retries the whole outcome).
    `systems` ({device: system config}) and `data` (the data config) go into the model."""
    from . import plots  # matplotlib is slow to import: only once a training ends

    folder = Path(checkpoint_dir) if checkpoint_dir else None
    if folder is not None and folder.is_dir() and systems is not None:
        from .models import save_model_from_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            model = save_model_from_checkpoint(folder, tmp, systems, data or {})
            if model is not None:  # a pyfunc model: mlflow.pyfunc.load_model("runs:/<run>/model")
                client.log_artifacts(run_id, str(model), "model")
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
                if is_outage(err):
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


class MlflowOps:
    """The `apply` a Journal is handed: one op (a dict naming one of OPS) on the store. With
    replay=True the op may have been applied before and must change nothing then. Placeholders in the
    op were replaced by the journal already; one still there names a run whose creation never reached
    the store, which the store would refuse anyway."""

    def __init__(self, client: MlflowClient, say: Callable[[str], None]):
        self.client = client
        self.say = say

    def __call__(self, op: dict, replay: bool) -> Any:
        if op.get("op") not in OPS:  # a journal written by another version: refused, set aside on replay
            raise ValueError(f"MLflow write {op.get('op')!r}: unknown; one of {sorted(OPS)}")
        return getattr(self, op["op"])(op, replay)

    @staticmethod
    def _run(op: dict) -> str:
        run = op["run"]
        if str(run).startswith(PLACEHOLDER):
            # The protobuf code, not its name: MlflowException reads an unknown name as INTERNAL_ERROR,
            # an outage, which would hold every write behind this one for good.
            raise MlflowException(f"run {run} was never created (its creation was refused); nothing can "
                                  f"be written to it", error_code=INVALID_STATE)
        return run

    def create_run(self, op: dict, replay: bool) -> str:
        ref = op["ref"]
        if replay:
            match = op.get("match") or {WRITE_ID_TAG: ref}
            flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in match.items())
            found = self.client.search_runs([op["experiment_id"]], filter_string=flt, max_results=1)
            if found:
                if op.get("reopen") and found[0].info.status != "RUNNING":
                    self.client.update_run(found[0].info.run_id, status="RUNNING")
                return found[0].info.run_id
        tags = {**(op.get("tags") or {}), WRITE_ID_TAG: ref}
        run = self.client.create_run(op["experiment_id"], run_name=op.get("run_name"), tags=tags,
                                     start_time=op.get("start_time"))
        return run.info.run_id

    def log_batch(self, op: dict, replay: bool) -> None:
        run = self._run(op)
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in op.get("metrics") or []]
        params = [Param(k, str(v)) for k, v in op.get("params") or []]
        tags = [RunTag(k, str(v)) for k, v in op.get("tags") or []]
        for i in range(0, len(metrics), 1000):  # MLflow's limits: 1000 metrics, 100 params per batch
            self.client.log_batch(run, metrics=metrics[i:i + 1000])
        for i in range(0, len(params), 100):
            self.client.log_batch(run, params=params[i:i + 100])
        if tags:
            self.client.log_batch(run, tags=tags)

    def set_terminated(self, op: dict, replay: bool) -> None:
        self.client.set_terminated(self._run(op), op.get("status", "FINISHED"), end_time=op.get("end_time"))

    def update_run(self, op: dict, replay: bool) -> None:
        self.client.update_run(self._run(op), status=op["status"])

    def set_tag(self, op: dict, replay: bool) -> None:
        self.client.set_tag(self._run(op), op["key"], str(op["value"]))

    def log_text(self, op: dict, replay: bool) -> None:
        self.client.log_text(self._run(op), op["text"], op["artifact_file"])

    def log_artifact(self, op: dict, replay: bool) -> None:
        self.client.log_artifact(self._run(op), op["local_path"], op.get("artifact_path"))

    def outcome(self, op: dict, replay: bool) -> None:
        try:
            log_outcome(self.client, self._run(op), op.get("folder"), op.get("title", ""), op.get("systems"),
                        op.get("data"))
        except Exception as err:  # noqa: BLE001 - artifacts are best effort, but an outage is retried
            if is_outage(err):
                raise
            self.say(f"a trial's artifacts could not be made ({err}); its run is kept without them")

    def failure(self, op: dict, replay: bool) -> None:
        log_failure(self.client, self._run(op), op["text"])

    def register_model(self, op: dict, replay: bool) -> None:
        """A run's model/ as a new version of the registered model `name` (created if new); once per
        run, so a replayed or resumed registration adds no second version."""
        run, name = self._run(op), op["name"]
        try:
            self.client.create_registered_model(name, description=op.get("description"))
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if any(v.run_id == run for v in self.client.search_model_versions(f"name = '{name}'")):
            return
        source = f"{self.client.get_run(run).info.artifact_uri.rstrip('/')}/model"
        self.client.create_model_version(name, source, run_id=run, tags=op.get("tags") or None)

    def log_inputs(self, op: dict, replay: bool) -> None:
        """The data set a run trained on (shown under the run's Datasets in the UI)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        d = op["dataset"]
        dataset = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                          schema=d.get("schema"), profile=d.get("profile"))
        tags = [InputTag("mlflow.data.context", op.get("context", "training"))]
        self.client.log_inputs(self._run(op), datasets=[DatasetInput(dataset, tags)])


OPS = ("create_run", "log_batch", "set_terminated", "update_run", "set_tag", "log_text", "log_artifact",
       "outcome", "failure", "register_model", "log_inputs")


# One journal file, one writer per process: a callback Tune unpickles on a resume finds the sweep's
# open writer by its folder (MlflowWriter.for_folder) rather than opening a second one on that file.
# Weak: a writer nobody holds any more leaves the table.
_OPEN_WRITERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


class MlflowWriter:
    """The MLflow writes of one sweep or training, done at once or kept in the journal in `folder` and
    replayed (see the module's docstring and farm/journal.py). Constructing it does no I/O; `open()`
    connects the client and reads what an earlier process kept. Reads (search_runs, get_run) go to
    `client` directly: they need the store now."""

    def __init__(self, uri: str, folder: str | Path, *, stream=None, retry_min_s: float = 2.0,
                 retry_max_s: float = 60.0, client: MlflowClient | None = None):
        self.uri = uri
        self.folder = Path(folder)
        self._client = client
        self.journal = Journal(self.folder, self._apply, name=JOURNAL_NAME, header={"tracking_uri": uri},
                               is_outage=is_outage, probe=lambda: reachable(uri),
                               label=f"MLflow tracking store {uri}", noun="MLflow write", stream=stream,
                               retry_min_s=retry_min_s, retry_max_s=retry_max_s)
        self._ops: MlflowOps | None = None
        self._open: set[str] = set()  # runs this process set RUNNING and has not ended (ids or placeholders)
        self.trial_runs: dict[str, str] = {}  # trial id -> its child run (id or placeholder) in this process

    def open(self) -> MlflowWriter:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        self._ops = MlflowOps(self._client, self.journal.say)
        self.journal.open()
        _OPEN_WRITERS[str(self.folder.resolve())] = self
        return self

    @classmethod
    def for_folder(cls, uri: str, folder: str | Path) -> MlflowWriter:
        """The writer this process has open on `folder`'s journal for `uri`, else a new one, opened."""
        found = _OPEN_WRITERS.get(str(Path(folder).resolve()))
        if found is not None and found.uri == uri:
            return found
        return cls(uri, folder).open()

    @property
    def client(self) -> MlflowClient:
        if self._client is None or self._ops is None:
            raise RuntimeError(f"MLflow writer for {self.uri}: not opened; call open() first")
        return self._client

    def _apply(self, op: dict, replay: bool) -> Any:
        return self._ops(op, replay)

    # ------------------------------------------------------------------ the journal's state
    @property
    def path(self) -> Path:
        return self.journal.path

    @property
    def pending(self) -> int:
        return self.journal.pending

    @property
    def replayed(self) -> int:
        return self.journal.replayed

    @property
    def stream(self):
        return self.journal.stream

    @stream.setter
    def stream(self, value) -> None:
        self.journal.stream = value

    def resolve(self, run: str | None) -> str | None:
        """A run id for a placeholder once its creation was replayed (else the placeholder itself)."""
        return self.journal.resolve(run)

    def maybe_flush(self) -> bool:
        return self.journal.maybe_flush()

    def flush(self, wait_s: float = 0.0, poll_s: float = 2.0) -> bool:
        return self.journal.flush(wait_s, poll_s)

    # ------------------------------------------------------------------ writing
    def experiment(self, name: str) -> str:
        """The experiment's id, created when missing (at once: nothing can be logged without it)."""
        return get_or_create_experiment(self.client, name, self.uri)

    def call(self, op: str, **args) -> Any:
        """Do one write now, or keep it while the store is down. Returns what the write returns (a
        create_run: the run id, or a placeholder while the store is down)."""
        if op not in OPS:
            raise ValueError(f"MLflow write '{op}': unknown; one of {sorted(OPS)}")
        now = int(time.time() * 1000)  # ms, kept with the write: a replayed run keeps its times
        if op == "create_run":
            args.setdefault("start_time", now)
        elif op == "set_terminated":
            args.setdefault("end_time", now)
        result = self.journal.submit({"op": op, **args}, creates=op == "create_run", files=self._files(op, args))
        self._track(op, args, args.get("run") or result)
        return result

    @staticmethod
    def _files(op: str, args: dict) -> dict:
        """The files a write reads, copied into the journal if it is kept (they must outlive the caller's
        temporary folders and the checkpoints Tune deletes)."""
        if op == "log_artifact":
            return {"local_path": args["local_path"]}
        if op == "outcome" and args.get("folder"):
            src = Path(args["folder"])
            return {"folder": [src / n for n in MODEL_FILES if (src / n).exists()]}
        return {}

    def _track(self, op: str, args: dict, run: str | None) -> None:
        if op == "create_run" or (op == "update_run" and args.get("status") == "RUNNING"):
            self._open.add(run)
        elif op == "set_terminated":
            self._open.discard(run)

    def open_runs(self) -> list[str]:
        return sorted(self._open)

    def note_trial(self, trial_id: str, run: str) -> None:
        self.trial_runs[trial_id] = run


def journal_uri(path: str | Path) -> str | None:
    """The tracking store a journal file's writes are for (its header)."""
    header = read_header(path)
    return header.get("tracking_uri") if header else None


def replay_file(path: str | Path, uri: str | None = None, stream=None) -> tuple[int, int]:
    """Replay a journal file (`physfarm report`): (writes replayed, still pending). A journal for
    another store than `uri` is left alone."""
    path = Path(path)
    target = journal_uri(path)
    if target is None or (uri is not None and target != uri):
        return 0, 0
    writer = MlflowWriter(target, path.parent, stream=stream).open()
    writer.flush()
    return writer.replayed, writer.pending
