"""`physfarm train CONFIG`: one training, no Tune: the trainer function runs directly in this process
against the config's device (started as a Ray actor like in a sweep, or found in a standing pool),
with a progress bar on stderr, logged to MLflow like one trial of a sweep (one run: the same params,
per-epoch metrics and artifacts, written through the same journalled writer, so it survives an MLflow
outage the same way).

Search spaces in `train`: `grid` and `choice` take their first value (noted on stderr; `physfarm
sweep` tries them all); ranges (uniform, loguniform, randint and their q-forms) are refused, since
no single value stands for them. With a method grid the first method runs, its section merged in.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .errors import ConfigError, join_path


def pick_first(train: dict, prefix: str = "train") -> tuple[dict, list[str]]:
    """`train` with each grid/choice replaced by its first value; ConfigError for ranges."""
    from .space import is_sampler

    notes: list[str] = []
    out = {}
    for key, value in train.items():
        path = join_path(prefix, key)
        if is_sampler(value):
            form, args = next(iter(value.items()))
            if form not in ("grid", "choice"):
                raise ConfigError(f"{path}: '{form}' is a search space, and `physfarm train` runs one "
                                  f"training: give one value (or use `physfarm sweep`)")
            out[key] = args[0]
            if len(args) > 1:
                notes.append(f"{path}: {form} -> {args[0]!r} (the first value; `physfarm sweep` tries all)")
        elif isinstance(value, dict):
            out[key], more = pick_first(value, path)
            notes += more
        else:
            out[key] = value
    return out, notes


class ProgressBar:
    """A one-line progress bar on a stream (redrawn in place on a terminal, a line per epoch otherwise)."""

    def __init__(self, total: int, stream=None, width: int = 24, start_epoch: int = 0):
        self.total = max(1, int(total))
        self.stream = stream or sys.stderr
        self.width = width
        self.t0 = time.monotonic()
        self.start_epoch = start_epoch
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn = False

    def line(self, epoch: int, metrics: dict) -> str:
        done = min(self.width, round(self.width * epoch / self.total))
        elapsed = time.monotonic() - self.t0
        per = elapsed / max(1, epoch - self.start_epoch)
        eta = per * (self.total - epoch)
        parts = [f"[{'#' * done}{'.' * (self.width - done)}] epoch {epoch}/{self.total}"]
        for key, label in (("loss", "loss"), ("train_accuracy", "train"), ("val_accuracy", "val"),
                           ("device_s_total", "device_s")):
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                parts.append(f"{label} {value:.3f}" if key != "device_s_total" else f"{label} {value:.2f}")
        parts.append(f"{elapsed:.0f}s elapsed, eta {eta:.0f}s")
        return "  ".join(parts)

    def update(self, epoch: int, metrics: dict) -> None:
        text = self.line(epoch, metrics)
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def cmd_train(args) -> int:
    from .config import load_config

    cfg = load_config(args.config)  # validates everything (every method, every value) first
    train, notes = pick_first(cfg.train)
    from .trainspec import resolve_train, validate_train

    devices = [d.name for d in cfg.devices]
    train_cfg = validate_train(train, devices)
    resolved = resolve_train(train, devices)
    method_name = str(resolved.get("method", "pat"))
    from .tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, cfg.tracking.uri)
    check_reachable(uri)  # an unreachable tracking server: one line, before anything starts
    for note in notes:
        print(f"physfarm train: {note}", file=sys.stderr)
    return run_training(cfg, train_cfg, method_name, uri, address=args.address, name=args.name,
                        quiet=args.quiet)


def run_training(cfg, train_cfg, method_name: str, uri: str, address: str | None = None,
                 name: str | None = None, quiet: bool = False, stream=None) -> int:
    """Train once and log one MLflow run; returns the exit code (0: finished, 1: the training failed).

    The run is written like a sweep's trial, through an MlflowWriter (farm/mlflow_ops.py): while the
    store is down the writes are kept in a journal under the config's storage_path and replayed when it
    answers, so an outage neither stops the training nor loses a write."""

    from .mlflow_ops import MlflowWriter, limit_http_retries
    from .device_facts import describe
    from .pool import device_metadata, devices_started
    from .runinfo import run_context
    from .sweep import init_ray, storage_path
    from .tracking import context_tags, log_device_facts, log_run_facts, outcome_facts
    from .trainable import trial_devices

    stream = stream or sys.stderr
    resolved = train_cfg.model_dump(mode="json")
    run_name = name or f"{cfg.sweep.name or 'train'}-{method_name}-{train_cfg.device}"
    limit_http_retries()
    writer = MlflowWriter(uri, journal_folder(storage_path(cfg), run_name)).open()
    experiment_id = writer.experiment(cfg.tracking.experiment)

    init_ray(address)
    context = run_context(cfg, user=cfg.tracking.user)
    run_id = writer.call("create_run", experiment_id=experiment_id, run_name=run_name,
                         tags={"physfarm.kind": "train", "physfarm.method": method_name,
                               "physfarm.device": str(train_cfg.device), **context_tags(context)})
    log_run_facts(writer, run_id, resolved, context)  # the same params, config.yaml and data set as a trial
    keep = Path(tempfile.mkdtemp(prefix="physfarm-train-"))  # the latest checkpoint, for the final artifacts
    last: dict = {}  # the latest epoch's metrics
    try:
        with devices_started(cfg.device(n) for n in trial_devices(train_cfg)):
            facts = device_metadata(trial_devices(train_cfg))
            for line in describe(facts):
                print(line, file=stream)
            log_device_facts(writer, run_id, facts)
            _train(cfg, method_name, train_cfg, writer, run_id, keep, last, quiet, stream)
    except BaseException as err:  # the devices are stopped by now; the run records the failure
        import traceback

        writer.call("failure", run=run_id, text="".join(traceback.format_exception(err)))
        writer.call("outcome", run=run_id, folder=str(keep) if any(keep.iterdir()) else None, title=run_name)
        writer.call("set_terminated", run=run_id, status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        shutil.rmtree(keep, ignore_errors=True)  # a kept outcome has its own copies
        if isinstance(err, (KeyboardInterrupt, ConfigError)):
            raise
        end_writes(writer, cfg.tracking.flush_wait_s)
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        print(f"physfarm train: failed: {type(err).__name__}: {lines[-1] if lines else ''} "
              f"(MLflow run {writer.resolve(run_id)})", file=sys.stderr)
        return 1
    writer.call("outcome", run=run_id, folder=str(keep), title=run_name, **outcome_facts(resolved, context))
    writer.call("set_terminated", run=run_id, status="FINISHED")
    shutil.rmtree(keep, ignore_errors=True)
    end_writes(writer, cfg.tracking.flush_wait_s)
    acc, val, sel = last.get("test_accuracy"), last.get("selected_val_accuracy"), last.get("selected_epoch")
    print(f"Trained {method_name} on device '{train_cfg.device}': epoch {sel} selected by val_accuracy "
          f"{val:.4f}; its test_accuracy {acc:.4f} (one pass on the test split)"
          if isinstance(acc, (int, float)) else "Trained: no test accuracy reported")
    print(f"MLflow: experiment '{cfg.tracking.experiment}', run {writer.resolve(run_id)}, store {uri}")
    return 0


def _train(cfg, method_name: str, train_cfg, writer, run_id: str, keep: Path, last: dict, quiet: bool,
           stream) -> None:
    """The training itself, with its devices up: each epoch's metrics to the run, its checkpoint to
    `keep`, the latest metrics to `last`, a progress bar to `stream`."""
    from trainers.registry import method

    from .data import load_dataset
    from .tracking import constant_params, epoch_rows
    from .runinfo import current_user
    from .trainable import EpochReporter, connect_devices

    bar = None if quiet else ProgressBar(train_cfg.epochs, stream)

    def sink(metrics: dict, folder: Path | None) -> None:
        last.clear()
        last.update(metrics)
        writer.call("log_batch", run=run_id, metrics=epoch_rows(metrics, int(metrics.get("epoch", 0))),
                    params=constant_params(metrics))
        if folder is not None:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(folder, keep)
        if bar is not None:
            bar.update(int(metrics.get("epoch", 0)), metrics)

    try:
        device = connect_devices(train_cfg, f"train/{run_id}", current_user(cfg.tracking.user))
        data = load_dataset(cfg.data)
        reporter = EpochReporter(device, method_name, train_cfg, data, sink)
        method(method_name).train(train_cfg, device, data, report=reporter, state=None)
    finally:
        if bar is not None:
            bar.close()


def journal_folder(storage: str | Path, run_name: str) -> Path:
    """Where one `physfarm train` keeps the MLflow writes its store did not take: a folder of its own
    under storage_path (two trainings never share a journal), one level down so that `physfarm report`
    finds it as it finds a sweep's. Nothing is written there unless the store goes down."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run_name).strip("._") or "train"
    return Path(storage) / f"train-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def end_writes(writer, wait_s: float) -> int:
    """Replay what the writer kept, waiting up to wait_s for a store that is still down; if it stays
    down, say where the writes are and how to replay them. Returns the writes still kept."""
    if not writer.pending or writer.flush(wait_s=wait_s):
        return 0
    print(f"physfarm train: MLflow tracking store {writer.uri} is still unreachable at the end of the "
          f"training: {writer.pending} MLflow writes are kept in {writer.path}. Nothing is lost: once the "
          f"store answers, `physfarm report --journal {writer.path}` replays them.", file=sys.stderr, flush=True)
    return writer.pending


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="run one training (no Tune) from a YAML config, logged to MLflow",
                       description="Run one training from a sweep config, without Tune: grid/choice take "
                                   "their first value; ranges are refused.")
    p.add_argument("config", help="config YAML (the same format as `physfarm sweep`)")
    p.add_argument("--address", default=None, help="existing Ray cluster address (default: start a local Ray)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the config's, or ./mlflow.db)")
    p.add_argument("--name", default=None, help="MLflow run name (default: <sweep.name>-<method>-<device>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
