"""A durable journal of MLflow writes, so a tracking outage loses nothing and stalls no training.

Every MLflow write of a sweep (create a run, params/metrics/tags, text and file artifacts, a trial's
outcome, terminate) goes through `TrackingJournal.call`. While the store answers, the write is done
at once. When it fails because the store is unreachable or erroring, the write, and every later one
(so that their order is kept), is appended to `<sweep folder>/mlflow_journal.jsonl` (one JSON object
per line, fsynced) with copies of the files it needs in `mlflow_journal_files/`. Later writes retry
the store with exponential backoff; once it answers, the journal is replayed in order.

Replay is idempotent, so a write replayed twice (a crash between replaying and trimming the journal)
changes nothing:
  - a run created during the outage has a placeholder id (`pending-<hex>`); its creation is replayed
    as find-or-create (by the trial's tags, or the unique `physfarm.write_id` tag), and the
    placeholder -> run id map is kept in `mlflow_journal_refs.json`;
  - metrics keep the timestamp they were taken at: MLflow's store skips an identical metric point;
  - params, tags, artifacts (same path) and run status are overwritten with the same values.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

JOURNAL = "mlflow_journal.jsonl"
REFS = "mlflow_journal_refs.json"
FILES = "mlflow_journal_files"
REJECTED = "mlflow_journal_rejected.jsonl"
PLACEHOLDER = "pending-"
WRITE_ID_TAG = "physfarm.write_id"

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
    """MLflow's own HTTP retries (7 by default, backoff doubling from 2 s) would hold Tune's driver loop
    for minutes per write while a server is down; the journal retries instead. A user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


class TrackingJournal:
    """MLflow writes of one sweep, done at once or kept and replayed (see the module's docstring)."""

    def __init__(self, uri: str, folder: str | Path, client: MlflowClient | None = None,
                 stream=None, retry_min_s: float = 2.0, retry_max_s: float = 60.0):
        self.uri = uri
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL
        self.client = client or MlflowClient(tracking_uri=uri)
        self.stream = stream
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self._lock = threading.RLock()
        self._pending: list[dict] = []
        self._refs: dict[str, str] = {}
        self._seq = 0
        self._delay = retry_min_s
        self._next_try = 0.0
        self._told_down = False
        self._announced = False
        self._why = ""
        self._open: set[str] = set()  # runs this process set RUNNING and has not ended (ids or placeholders)
        self.trial_runs: dict[str, str] = {}  # trial id -> its child run (id or placeholder) in this process
        self.replayed = 0  # writes replayed in this process
        self._load()

    # ------------------------------------------------------------------ state on disk
    def _load(self) -> None:
        refs = self.folder / REFS
        if refs.exists():
            try:
                self._refs = json.loads(refs.read_text())
            except ValueError:
                self._refs = {}
        if not self.path.exists():
            return
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short by a kill mid-write: never acknowledged, so never relied on
                continue
            if "op" in entry:
                self._pending.append(entry)
                self._seq = max(self._seq, int(entry.get("seq", 0)) + 1)

    def _header(self) -> str:
        return json.dumps({"journal": 1, "tracking_uri": self.uri}) + "\n"

    def _append(self, entry: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a") as fh:
            if new:
                fh.write(self._header())
            fh.write(json.dumps(entry, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _rewrite(self) -> None:
        """Trim the journal to what is still pending (the file is removed once empty)."""
        if not self._pending:
            if self.path.exists():
                self.path.unlink()
            shutil.rmtree(self.folder / FILES, ignore_errors=True)
            return
        _fsync_write(self.path, self._header() + "".join(json.dumps(e, default=str) + "\n" for e in self._pending))
        keep = {str(e["seq"]) for e in self._pending}
        files = self.folder / FILES
        if files.is_dir():
            for sub in files.iterdir():
                if sub.name not in keep:
                    shutil.rmtree(sub, ignore_errors=True)

    def _save_refs(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _fsync_write(self.folder / REFS, json.dumps(self._refs, indent=1))

    # ------------------------------------------------------------------ public
    @property
    def pending(self) -> int:
        return len(self._pending)

    def resolve(self, run: str | None) -> str | None:
        """A run id for a placeholder once its creation was replayed (else the placeholder itself)."""
        if run is None:
            return None
        return self._refs.get(run, run)

    def note_open(self, run: str) -> None:
        self._open.add(run)

    def note_trial(self, trial_id: str, run: str) -> None:
        self.trial_runs[trial_id] = run

    def open_runs(self) -> list[str]:
        return sorted(self._open)

    def call(self, op: str, **args) -> Any:
        """Do one write now, or keep it when the store is down. Returns what the write returns (a
        create_run: the run id, or a placeholder while the store is down)."""
        if op not in OPS:
            raise ValueError(f"journal op '{op}': unknown; one of {sorted(OPS)}")
        with self._lock:
            if op == "create_run":
                args.setdefault("ref", PLACEHOLDER + uuid.uuid4().hex)
                args["tags"] = {**args.get("tags", {}), WRITE_ID_TAG: args["ref"]}
                args.setdefault("start_time", int(time.time() * 1000))  # ms; a replayed run keeps it
            if op in ("set_terminated",):
                args.setdefault("end_time", int(time.time() * 1000))
            if self._pending:
                self.maybe_flush()
            if not self._pending:
                try:
                    result = OPS[op](self, args, replay=False)
                except Exception as err:  # noqa: BLE001 - classified: an outage is kept, a refusal raised
                    if not is_outage(err):
                        raise
                    self._went_down(err)
                else:
                    self._track(op, args, args.get("run") or result)
                    return result
            self._keep(op, args)
            self._announce()
            self._track(op, args, args.get("run") or args.get("ref"))
            return args["ref"] if op == "create_run" else None

    def _track(self, op: str, args: dict, run: str | None) -> None:
        if op in ("create_run",) or (op == "update_run" and args.get("status") == "RUNNING"):
            self._open.add(run)
        elif op == "set_terminated":
            self._open.discard(run)

    def _keep(self, op: str, args: dict) -> None:
        seq = self._seq
        self._seq += 1
        entry = {"seq": seq, "op": op, "t": time.time(), **args}
        # Files must outlive the write's caller (temp folders, checkpoints Tune deletes): copy them.
        # Paths relative to the journal's folder, so a journal moved elsewhere still replays.
        if op == "log_artifact":
            entry["local_path"] = self._copy(seq, [Path(args["local_path"])])[0]
        elif op == "outcome" and args.get("folder"):
            src = Path(args["folder"])
            names = [src / n for n in ("params.npz", "twin.pt", "predictions.npz") if (src / n).exists()]
            self._copy(seq, names)
            entry["folder"] = f"{FILES}/{seq}"
        self._pending.append(entry)
        self._append(entry)
        if self._told_down and len(self._pending) in (100, 1000, 10000):
            self._say(f"still unreachable; {len(self._pending)} MLflow writes kept in {self.path}")

    def _copy(self, seq: int, paths: list[Path]) -> list[str]:
        dest = self.folder / FILES / str(seq)
        dest.mkdir(parents=True, exist_ok=True)
        out = []
        for p in paths:
            shutil.copy2(p, dest / p.name)
            out.append(f"{FILES}/{seq}/{p.name}")
        return out

    def _say(self, text: str) -> None:
        print(f"physfarm: MLflow tracking store {self.uri}: {text}", file=self.stream or sys.stderr, flush=True)

    def _went_down(self, err: BaseException) -> None:
        self._next_try = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.retry_max_s)
        if not self._told_down:
            self._told_down = True
            line = str(err).strip().splitlines()
            self._why = line[0][:200] if line else type(err).__name__

    def _announce(self) -> None:
        """Told once per outage, after the first write is kept (so the count is right)."""
        if self._told_down and not self._announced:
            self._announced = True
            self._say(f"unreachable ({self._why}); training goes on. {len(self._pending)} MLflow write(s) kept "
                      f"so far in {self.path}, replayed in order when it answers again (retrying with backoff)")

    def _reachable(self) -> bool:
        if not self.uri.startswith(("http://", "https://")):
            return True  # a database: the replay itself tells
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=3) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def maybe_flush(self) -> bool:
        """Replay the journal if its backoff allows; True when nothing is pending afterwards."""
        with self._lock:
            if not self._pending:
                return True
            if time.monotonic() < self._next_try:
                return False
            return self._flush()

    def flush(self, wait_s: float = 0.0, poll_s: float = 2.0) -> bool:
        """Replay now (ignoring the backoff), trying again for up to wait_s; True when nothing is pending."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while True:
                if not self._pending or self._flush():
                    return True
                if time.monotonic() + poll_s > deadline:
                    return False
                time.sleep(poll_s)

    def _flush(self) -> bool:
        if not self._reachable():
            self._went_down(ConnectionError("health check failed"))
            return False
        done = 0
        try:
            while self._pending:
                entry = self._pending[0]
                args = {k: v for k, v in entry.items() if k not in ("seq", "op", "t")}
                try:
                    OPS[entry["op"]](self, args, replay=True)
                except Exception as err:  # noqa: BLE001
                    if is_outage(err):
                        raise
                    self._reject(entry, err)  # refused for good: set aside, never blocks the rest
                self._pending.pop(0)
                done += 1
                if done % 50 == 0:
                    self._rewrite()
        except Exception as err:  # noqa: BLE001 - an outage again: keep the rest for later
            self._rewrite()
            self._went_down(err)
            self.replayed += done
            return False
        self._rewrite()
        self.replayed += done
        self._delay = self.retry_min_s
        if done:
            self._say(f"answers again; replayed {done} kept MLflow writes from {self.path}")
        self._told_down = self._announced = False
        return True

    def _reject(self, entry: dict, err: BaseException) -> None:
        with open(self.folder / REJECTED, "a") as fh:
            fh.write(json.dumps({**entry, "error": str(err)[:2000]}, default=str) + "\n")
        self._say(f"refused a kept write ({entry['op']}: {str(err).splitlines()[0][:200]}); "
                  f"set aside in {self.folder / REJECTED}")


# ----------------------------------------------------------------------------------------------------
# The writes. Each takes (journal, args, replay) and must be idempotent when replay is True.
# ----------------------------------------------------------------------------------------------------
def _run(j: TrackingJournal, args: dict) -> str:
    run = j.resolve(args["run"])
    if run.startswith(PLACEHOLDER):
        raise MlflowException(f"run {run} was never created", error_code="INVALID_STATE")
    return run


def _create_run(j: TrackingJournal, args: dict, replay: bool) -> str:
    ref = args["ref"]
    if replay:
        if ref in j._refs:
            return j._refs[ref]
        match = args.get("match") or {WRITE_ID_TAG: ref}
        flt = " and ".join(f"tags.`{k}` = '{j.resolve(v) if k != WRITE_ID_TAG else v}'" for k, v in match.items())
        found = j.client.search_runs([args["experiment_id"]], filter_string=flt, max_results=1)
        if found:
            run_id = found[0].info.run_id
            if args.get("reopen") and found[0].info.status != "RUNNING":
                j.client.update_run(run_id, status="RUNNING")
            j._refs[ref] = run_id
            j._save_refs()
            return run_id
    # A tag naming a run created during the outage (the parent's id in a child) takes its real id.
    tags = {k: j.resolve(v) if str(v).startswith(PLACEHOLDER) and k != WRITE_ID_TAG else v
            for k, v in (args.get("tags") or {}).items()}
    run = j.client.create_run(args["experiment_id"], run_name=args.get("run_name"), tags=tags,
                              start_time=args.get("start_time"))
    if replay:
        j._refs[ref] = run.info.run_id
        j._save_refs()
    return run.info.run_id


def _log_batch(j: TrackingJournal, args: dict, replay: bool) -> None:
    run = _run(j, args)
    metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in args.get("metrics") or []]
    params = [Param(k, str(v)) for k, v in args.get("params") or []]
    tags = [RunTag(k, str(v)) for k, v in args.get("tags") or []]
    for i in range(0, max(len(metrics), 1), 1000):  # MLflow's limits: 1000 metrics, 100 params per batch
        if metrics[i:i + 1000]:
            j.client.log_batch(run, metrics=metrics[i:i + 1000])
    for i in range(0, len(params), 100):
        j.client.log_batch(run, params=params[i:i + 100])
    if tags:
        j.client.log_batch(run, tags=tags)


def _set_terminated(j: TrackingJournal, args: dict, replay: bool) -> None:
    j.client.set_terminated(_run(j, args), args.get("status", "FINISHED"), end_time=args.get("end_time"))


def _update_run(j: TrackingJournal, args: dict, replay: bool) -> None:
    j.client.update_run(_run(j, args), status=args["status"])


def _set_tag(j: TrackingJournal, args: dict, replay: bool) -> None:
    value = str(args["value"])
    j.client.set_tag(_run(j, args), args["key"], j.resolve(value) if value.startswith(PLACEHOLDER) else value)


def _log_text(j: TrackingJournal, args: dict, replay: bool) -> None:
    j.client.log_text(_run(j, args), args["text"], args["artifact_file"])


def _log_artifact(j: TrackingJournal, args: dict, replay: bool) -> None:
    j.client.log_artifact(_run(j, args), str(j.folder / args["local_path"]), args.get("artifact_path"))


def _outcome(j: TrackingJournal, args: dict, replay: bool) -> None:
    from .tracking import log_outcome

    try:
        folder = j.folder / args["folder"] if args.get("folder") else None  # absolute stays absolute
        log_outcome(j.client, _run(j, args), folder, args.get("title", ""))
    except Exception as err:  # noqa: BLE001 - artifacts are best effort, but an outage is retried
        if is_outage(err):
            raise
        j._say(f"a trial's artifacts could not be made ({err}); its run is kept without them")


def _failure(j: TrackingJournal, args: dict, replay: bool) -> None:
    from .tracking import log_failure

    log_failure(j.client, _run(j, args), args["text"])


OPS: dict[str, Callable[[TrackingJournal, dict, bool], Any]] = {
    "create_run": _create_run, "log_batch": _log_batch, "set_terminated": _set_terminated,
    "update_run": _update_run, "set_tag": _set_tag, "log_text": _log_text, "log_artifact": _log_artifact,
    "outcome": _outcome, "failure": _failure,
}

# One journal per (store, sweep folder) in this process: the sweep's parent run and Tune's callback
# (which Tune unpickles on a resume, so it cannot be handed one) share it.
_JOURNALS: dict[tuple[str, str], TrackingJournal] = {}


def journal_for(uri: str, folder: str | Path) -> TrackingJournal:
    key = (uri, str(Path(folder).resolve()))
    if key not in _JOURNALS:
        _JOURNALS[key] = TrackingJournal(uri, folder)
    return _JOURNALS[key]


def forget(uri: str, folder: str | Path) -> None:
    _JOURNALS.pop((uri, str(Path(folder).resolve())), None)


def journal_uri(path: str | Path) -> str | None:
    """The tracking store a journal file's writes are for (its first line)."""
    try:
        with open(path) as fh:
            return json.loads(fh.readline()).get("tracking_uri")
    except (OSError, ValueError):
        return None


def replay_file(path: str | Path, uri: str | None = None, stream=None) -> tuple[int, int]:
    """Replay a journal file (`physfarm report`, `sweep --resume`): (writes replayed, still pending)."""
    path = Path(path)
    target = journal_uri(path)
    if target is None or (uri is not None and target != uri):
        return 0, 0
    j = journal_for(target, path.parent)
    if stream is not None:
        j.stream = stream
    before = j.replayed
    j.flush()
    return j.replayed - before, j.pending
