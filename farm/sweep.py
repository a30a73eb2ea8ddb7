"""A sweep: Ray Tune over trainings that share the device pool, tracked in MLflow.

The Tune experiment folder (<storage_path>/<sweep name>) also holds `physfarm_sweep.json`: the
sweep's MLflow parent run, tracking store, config digest and status. `resume=True` continues an
interrupted sweep from there (Tuner.restore): finished trials are not rerun, unfinished ones resume
from their last checkpoint, and the same parent run and child runs go on.
"""
from __future__ import annotations

import enum
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import tune

from .config import FarmConfig
from .raycluster import check_trial_cpus, init_ray, usable_cpus  # noqa: F401 - re-exported
from .sweep_folder import (MARKER, check_resumable, config_digest, read_marker, reset_marker,  # noqa: F401
                           storage_path, sweep_name, sweep_step, write_marker)
from .sweep_folder import child_runs as _child_runs, saved_trials as _saved_trials
from .data import load_arrays
from .device_facts import describe
from .phases import mark
from .pool import device_metadata, devices_started, find_device, launch_device
from .journal import PLACEHOLDER
from .mlflow_ops import MlflowWriter, limit_http_retries
from .tracking import (PARENT_TAG, MLflowCallback, SweepTracker, check_reachable, log_device_facts,
                       resolve_tracking_uri)
from .console import ConsoleCallback, SweepView
from .runinfo import ended_by, pick, run_context, run_name
from .trainable import run_trial
from .trainspec import resolve_train
from .trainspec import expected_trials
from .tuning import build_param_space, build_scheduler, build_search, uses_pbt
from . import budget as budgets
from .fidelity import PROMOTED, FidelityInfo, at_fidelity, fidelity_plan



@dataclass
class TrialRow:
    trial_id: str
    config: dict  # the sampled values, by key (method sections' keys without the section)
    metrics: dict
    status: str
    error: str | None = None
    run_id: str | None = None


@dataclass
class SweepOutcome:
    name: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    rows: list[TrialRow] = field(default_factory=list)
    storage_path: str = ""
    interrupted: bool = False
    resumed: bool = False
    journal_pending: int = 0  # MLflow writes still kept in journal_path (the store was down at the end)
    journal_path: str = ""
    experiment_id: str | None = None

    @property
    def path(self) -> str:
        return str(Path(self.storage_path) / self.name)

    def leaderboard(self, metric: str = "val_accuracy", mode: str = "max") -> list[TrialRow]:
        """Finished trials best first (by their selected checkpoint's `metric`), then the others."""
        def key(row: TrialRow):
            value = selected_value(row.metrics, metric)
            if row.status != "TERMINATED" or not isinstance(value, (int, float)) or value != value:
                return (1, 0.0, row.trial_id)
            # ties go to the lower trial id, as in `physfarm report` (so both name the same best trial)
            return (0, -value if mode == "max" else value, row.trial_id)
        return sorted(self.rows, key=key)


def selected_value(metrics: dict, metric: str):
    """A trial's value of `metric` at the checkpoint it selected (`best_<metric>` where the trainer
    reports one, e.g. best_val_accuracy), else its last reported value."""
    value = metrics.get(f"best_{metric}")
    return metrics.get(metric) if value is None else value


def _last_line(error: BaseException) -> str:
    """The exception's own message (Ray wraps it in a traceback whose first line says nothing)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


class TrialDescription:
    """trial -> (what varies, e.g. "lr=0.03 seed=1"; its epochs): the console's and the run names'
    label of a trial (a class, not a closure: Tune pickles the callbacks holding it)."""

    def __init__(self, keys: list[str], devices: list[str]):
        self.keys, self.devices = list(keys), list(devices)

    def __call__(self, trial) -> tuple[str, int | None]:
        config = trial.config or {}
        train = dict(config.get("train", {}))
        # labelled by its configuration as written (a multifidelity screen says "method=pat" as the
        # leaderboard does, not the in-silico form it runs as); the epochs are those it runs
        epochs = resolve_train(at_fidelity(train, config.get("fidelity")), self.devices).get("epochs")
        label = run_name(resolve_train(train, self.devices), self.keys, trial.trial_id)
        return label, int(epochs) if isinstance(epochs, int) else None


class SweepStatus(str, enum.Enum):
    """Where a sweep stands; also what its marker file records (`status`)."""

    PREPARED = "prepared"        # store, journal and Ray ready; no parent run yet
    RUNNING = "running"          # the parent run is open and Tune runs the trials
    FINISHED = "finished"        # every trial ended (TERMINATED or ERROR)
    INTERRUPTED = "interrupted"  # stopped with trials left (Ctrl-C, SIGTERM, Tune failing): --resume goes on
    FAILED = "failed"            # nothing ran (the Tune run could not be built): a new start may follow


@dataclass
class SweepPlan:
    """What `prepare` settles and every later phase reads (and `status`, which they move on)."""

    cfg: FarmConfig
    name: str
    uri: str
    folder: Path
    marker: dict | None  # the earlier run's marker when resuming
    journal: MlflowWriter
    tracker: SweepTracker
    context: dict
    devices: list[str]
    keys: list[str]  # what varies between trials (leaderboard columns, run names)
    resume_errored: bool = False
    arrays: dict | None = None  # the data set, loaded once here for every trial (farm.data.load_arrays)
    launched: dict = field(default_factory=dict)  # devices launched by prepare: {name: (handles, created)}
    status: SweepStatus = SweepStatus.PREPARED
    parent: str | None = None
    saved: dict = field(default_factory=dict)  # trial id -> trial, Tune's saved state after the run
    expected: int | None = None  # trials in all, where not expected_trials(cfg) (multifidelity: screened + promoted)
    budget: dict | None = None  # the device budget's last figures (budget_s, spent_s, remaining_s)
    started_at: float | None = None  # wall time the sweep first started (its budget's and devices' metric steps count from it)

    @property
    def budget_spent(self) -> bool:
        """The sweep ended because its device budget (sweep.device_budget_s) was spent."""
        return self.budget is not None and self.budget["remaining_s"] <= 0

    @property
    def finished_before(self) -> bool:
        """A resumed sweep that had finished: Tune has nothing to run, and nothing is written again."""
        return self.marker is not None and self.marker.get("status") == SweepStatus.FINISHED.value


def run_sweep(cfg: FarmConfig, address: str | None = None, tracking_uri: str | None = None,
              name: str | None = None, verbose: int = 0, resume: bool = False,
              resume_errored: bool = False, flush_wait_s: float | None = None,
              show: bool = False, stream=None, lan: bool = False, opened=None) -> SweepOutcome:
    """Run a sweep in its phases: prepare, devices started, run, collect, finish.

    Ray: the one this process is connected to, else joined at `address`, else started for this sweep
    (`lan`: on the network address, else on 127.0.0.1 only). `opened`: a future of
    `open_store_and_data` the caller started (the CLI, while it starts Ray).

    verbose: Tune's own tables (1) or none (0); show: physfarm's live view of the trials and devices
    on `stream` (stdout; redrawn in place on a terminal, periodic lines otherwise).
    flush_wait_s (default: tracking.flush_wait_s): how long the end of the sweep waits for a tracking
    store that is down to answer again before it leaves the kept MLflow writes in the journal
    (replayed by `physfarm report` or `--resume`)."""
    plan = prepare(cfg, address, tracking_uri, name, resume, resume_errored, lan=lan, opened=opened)
    mark("prepared")
    with devices_started(cfg.devices, plan.launched):
        mark("devices_started")
        note_devices(plan, stream)
        grid = run(plan, verbose=verbose, show=show, stream=stream)
        mark("tune_done")
    outcome = collect(plan, grid)
    mark("collected")
    outcome = finish(plan, outcome, cfg.tracking.flush_wait_s if flush_wait_s is None else flush_wait_s)
    mark("finished")
    return outcome


def prepare(cfg: FarmConfig, address: str | None = None, tracking_uri: str | None = None,
            name: str | None = None, resume: bool = False, resume_errored: bool = False,
            lan: bool = False, opened=None) -> SweepPlan:
    """Check the store and the sweep folder, then at once: start or join Ray, launch the devices, open
    the sweep's MLflow writer (replaying what an earlier run of it kept) and load the data the trials
    will share (`open_store_and_data`; `opened`: a future of it that the caller started already).
    Opens no run, and waits for no device."""
    uri = resolve_tracking_uri(tracking_uri, cfg.tracking.uri)
    check_reachable(uri)
    name = sweep_name(cfg, name)
    folder = Path(storage_path(cfg)) / name
    marker = check_resumable(cfg, uri, name, resume)
    # Starting Ray is mostly waiting for its processes (on the other cores): the MLflow store's opening
    # (an SQLite schema on first use) and the data's loading go on meanwhile, on a thread, instead of
    # after it. Ray itself starts on this (the main) thread: the processes it starts are bound to the
    # thread that starts them (they end with it), and it installs its signal handlers there.
    launched: dict = {}
    with ThreadPoolExecutor(1, thread_name_prefix="physfarm-store") as pool:
        side = opened if opened is not None else pool.submit(open_store_and_data, cfg, uri, folder, marker)
        try:
            init_ray(address, lan)
            # The devices' processes start now too (waited for in run_sweep's devices_started).
            for dev in cfg.devices:
                if find_device(dev.name) is None:
                    launched[dev.name] = launch_device(dev)
            journal, arrays = side.result()  # a store that is down says so here
        except BaseException:
            for _handles, created in launched.values():
                for handle in created:
                    ray.kill(handle, no_restart=True)
            raise
    keys = _sampled_keys(cfg)
    context = run_context(cfg, keys, cfg.tracking.user)
    return SweepPlan(cfg=cfg, name=name, uri=uri, folder=folder, marker=marker, journal=journal,
                     tracker=SweepTracker(journal, cfg.tracking.experiment, name, context), context=context,
                     devices=[d.name for d in cfg.devices], keys=keys, resume_errored=resume_errored,
                     arrays=arrays, launched=launched)


def open_store_and_data(cfg: FarmConfig, uri: str, folder: Path, marker: dict | None) -> tuple:
    """(the sweep's MLflow writer, open, with what an earlier run of the sweep kept replayed; the data
    set's arrays, farm.data.load_arrays). Needs no Ray: it runs while Ray starts."""
    limit_http_retries()
    journal = MlflowWriter(uri, folder).open()  # the sweep's MLflow writes, its tracker's and callbacks'
    if marker is not None:
        _replay_before_resume(journal, marker, folder)
    return journal, load_arrays(cfg.data)


def note_devices(plan: SweepPlan, stream=None) -> None:
    """Ask the started devices what they report of themselves (a recorded device: its fit); print it,
    and keep it for the runs' tags."""
    facts = device_metadata(plan.devices)
    plan.context["device_facts"] = facts
    for line in describe(facts):
        print(line, file=stream or sys.stdout)


def run(plan: SweepPlan, verbose: int = 0, show: bool = False, stream=None):
    """Open (or reopen) the parent run and let Tune run the trials; returns Tune's ResultGrid. On the
    way out, also on an error or a second Ctrl-C, the sweep's state is recorded: what ran is kept and
    `--resume` continues it."""
    try:
        _open_parent(plan)
        log_device_facts(plan.journal, plan.parent, plan.context.get("device_facts") or {})
        _start_budget(plan)
        mark("tune_start")
        plan.status = SweepStatus.RUNNING
        if fidelity_plan(plan.cfg) is not None:
            from .fidelity_run import run_phases

            grid = run_phases(plan, lambda **kw: _tuner(plan, verbose, show, stream, **kw))
        else:
            grid = _tuner(plan, verbose, show, stream).fit()
            plan.saved = _saved_trials(plan.folder)
        plan.budget = budgets.budget_figures(plan.name) if plan.cfg.sweep.device_budget_s else None
        ended = plan.budget_spent or not _stopped_early(plan, len(grid))
        plan.status = SweepStatus.FINISHED if ended else SweepStatus.INTERRUPTED
        return grid
    except BaseException:
        plan.status = SweepStatus.INTERRUPTED if plan.status is SweepStatus.RUNNING else SweepStatus.FAILED
        raise
    finally:
        _end_budget(plan, stream)
        _record_unfinished(plan)


def _start_budget(plan: SweepPlan) -> None:
    """The sweep's device budget actor (sweep.device_budget_s); a resume goes on from what the
    sweep's earlier runs spent (its marker)."""
    total = plan.cfg.sweep.device_budget_s
    if not total:
        return
    before = float((plan.marker or {}).get("device_s_spent", 0.0) or 0.0)
    budgets.start_budget(plan.name, total, plan.devices, [f"{plan.name}/"], before)


def _end_budget(plan: SweepPlan, stream=None) -> None:
    """Record what the sweep spent (marker: a resume's starting point; parent run), say it, stop the actor."""
    if not plan.cfg.sweep.device_budget_s:
        return
    figures = budgets.budget_figures(plan.name) or plan.budget
    budgets.stop_budget(plan.name)
    if figures is None:
        return
    plan.budget = figures
    write_marker(plan.folder, device_s_spent=figures["spent_s"], budget_spent=figures["remaining_s"] <= 0)
    if plan.parent:
        budgets.log_budget(plan.journal, plan.parent, figures, sweep_step(plan.started_at or time.time()))
        plan.journal.call("set_tag", run=plan.parent, key="physfarm.budget_spent",
                          value=str(figures["remaining_s"] <= 0).lower())
    print(f"physfarm: sweep '{plan.name}': {budgets.budget_line(figures)}", file=stream or sys.stdout, flush=True)


def collect(plan: SweepPlan, grid) -> SweepOutcome:
    """One row per trial from Tune's results: what varied, its metrics, status, error and MLflow run."""
    outcome = SweepOutcome(plan.name, plan.uri, plan.cfg.tracking.experiment, plan.parent,
                           storage_path=str(plan.folder.parent),
                           interrupted=plan.status is SweepStatus.INTERRUPTED, resumed=plan.marker is not None)
    runs = _child_runs(plan.tracker, plan.journal)
    by_path = {str(t.path): t for t in plan.saved.values()}  # each result's trial in Tune's saved state
    for result in grid:
        trial = by_path.get(str(result.path))
        trial_id = (result.metrics or {}).get("trial_id") or (trial.trial_id if trial else Path(result.path).name)
        resolved = resolve_train(dict((result.config or {}).get("train", {})), plan.devices)
        # an interrupted sweep's trials may be unfinished (PENDING, RUNNING, PAUSED): their saved status
        recurring = ended_by(result.metrics)
        status = "ERROR" if result.error or recurring else \
            plan.saved[trial_id].status if outcome.interrupted and trial_id in plan.saved else "TERMINATED"
        if plan.budget_spent and not result.metrics and status == "TERMINATED":
            status = "STOPPED"  # never started: the device budget was spent first
        outcome.rows.append(TrialRow(
            trial_id=trial_id,
            config={k: pick(resolved, k) for k in plan.keys},
            metrics=dict(result.metrics or {}),
            status=status,
            error=_last_line(result.error) if result.error else recurring,
            run_id=runs.get(trial_id),
        ))
    outcome.journal_path = str(plan.journal.path)
    outcome.experiment_id = plan.tracker.experiment_id
    return outcome


def finish(plan: SweepPlan, outcome: SweepOutcome, flush_wait_s: float) -> SweepOutcome:
    """A finished sweep: the parent run gets the leaderboard, the best trial and its registered model;
    the journal is flushed; the marker says finished. An interrupted one is left as `run` recorded it."""
    if plan.status is not SweepStatus.FINISHED:
        outcome.journal_pending = plan.journal.pending
        return outcome
    cfg, journal = plan.cfg, plan.journal
    board = outcome.leaderboard(cfg.sweep.metric, cfg.sweep.mode)
    best = board[0] if board and board[0].status == "TERMINATED" else None
    if not plan.finished_before:
        plan.tracker.finish(
            {"trial_id": best.trial_id, "run_id": best.run_id, "metrics": _best_figures(best, cfg.sweep.metric)}
            if best else None,
            leaderboard=[_row_json(i, r, cfg.sweep.metric) for i, r in enumerate(board, 1)],
            model_name=cfg.tracking.model_name or plan.name)
    outcome.journal_pending = _end_journal(journal, plan.name, flush_wait_s, plan.folder)
    outcome.parent_run_id = journal.resolve(plan.parent)
    for row in outcome.rows:
        row.run_id = journal.resolve(row.run_id)
    write_marker(plan.folder, status=SweepStatus.FINISHED.value, parent_run_id=outcome.parent_run_id,
                 journal_pending=outcome.journal_pending)
    return outcome


def _best_figures(best: TrialRow, metric: str) -> dict:
    """What the parent run shows of its best trial (logged as best_<name>): the ranking metric at the
    checkpoint it selected, that checkpoint's test accuracy and epoch, and its device seconds."""
    figures = {metric: selected_value(best.metrics, metric)}
    figures.update({k: best.metrics.get(k) for k in ("test_accuracy", "selected_epoch", "device_s_total")})
    return {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _open_parent(plan: SweepPlan) -> None:
    """The sweep's parent run: new, reopened for a resume, or (a finished sweep resumed) only looked up."""
    tracker, journal, marker, cfg = plan.tracker, plan.journal, plan.marker, plan.cfg
    if plan.finished_before:
        plan.parent = tracker.parent_run_id = journal.resolve(marker["parent_run_id"])
        tracker.experiment_id = marker.get("experiment_id")
    elif marker is not None:
        plan.parent = tracker.resume(journal.resolve(marker["parent_run_id"]))
    else:
        plan.parent = tracker.start(cfg.model_dump(mode="json"), [d.model_dump(mode="json") for d in cfg.devices])
        # A new sweep in the folder of a finished one of the same name: that one's record (its budget
        # spent, its promotions) must not pass for this one's on a later --resume.
        reset_marker(plan.folder)
    plan.started_at = float((marker or {}).get("started_at") or time.time())
    write_marker(plan.folder, started_at=plan.started_at, parent_run_id=plan.parent, experiment_id=tracker.experiment_id,
                 experiment=cfg.tracking.experiment, tracking_uri=plan.uri, config_digest=config_digest(cfg),
                 status=SweepStatus.RUNNING.value)


def _tuner(plan: SweepPlan, verbose: int, show: bool, stream, *, folder: Path | None = None, restore: bool | None = None,
           param_space: dict | None = None, scheduler=None, num_samples: int | None = None,
           search=None, fidelity: FidelityInfo | None = None, title: str | None = None):
    """The Tune run: restored from the sweep folder on a resume (its callbacks come back from Tune's
    state and find the sweep's writer by its folder), else new, with the MLflow callback, the device
    budget's stopper and callback when the sweep has one, and, when shown, the console.

    The multifidelity strategy (farm.fidelity_run) runs two: the keywords give the second one's
    folder, search space, scheduler and what its MLflow runs say of their fidelities."""
    cfg = plan.cfg
    folder = folder or plan.folder
    budgeted = bool(cfg.sweep.device_budget_s)
    # the trials' client ids at the devices: all under `<sweep>/`, the promoted ones `<sweep>/promoted/...`
    clients = f"{plan.name}/{PROMOTED}" if fidelity is not None and fidelity.stage > 0 else plan.name
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=cfg.data.model_dump(mode="json"), devices=plan.devices,
                             pbt=uses_pbt(cfg), user=plan.context["user"], metric=cfg.sweep.metric,
                             budget=plan.name if budgeted else None, arrays=plan.arrays, clients=clients),
        {"cpu": cfg.sweep.trial_cpus},
    )
    if restore if restore is not None else plan.marker is not None:
        return tune.Tuner.restore(str(folder), trainable, resume_unfinished=True,
                                  resume_errored=plan.resume_errored)
    sched = cfg.sweep.scheduler
    watch = [k for k in _leaf_paths(sched.hyperparam_mutations or {})] if uses_pbt(cfg) else []
    callbacks = [MLflowCallback(plan.journal, plan.tracker.experiment_id, plan.parent, plan.name, plan.devices,
                                watch, plan.context, fidelity=fidelity)]
    view = SweepView(title or f"sweep '{plan.name}'")
    if budgeted:  # before the console: its figures at the end of a Tune run are in the view the console closes with
        callbacks.append(budgets.BudgetCallback(plan.name, plan.journal, plan.parent, view if show else None,
                                                started=plan.started_at))
    if show:
        callbacks.append(ConsoleCallback(view, plan.devices, TrialDescription(plan.keys, plan.devices),
                                         writer=plan.journal, parent_run=plan.parent, stream=stream,
                                         started=plan.started_at))
    return tune.Tuner(
        trainable,
        param_space=param_space if param_space is not None else build_param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.sweep.metric, mode=cfg.sweep.mode,
            num_samples=num_samples if num_samples is not None else cfg.sweep.num_samples,
            max_concurrent_trials=cfg.sweep.max_concurrent_trials,
            search_alg=build_search(cfg) if param_space is None else search,
            scheduler=scheduler if param_space is not None else build_scheduler(cfg), reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=folder.name, storage_path=str(folder.parent), callbacks=callbacks, verbose=verbose,
            stop=budgets.BudgetStopper(plan.name) if budgeted else None,
            # A trial whose worker fails or dies is retried from its last checkpoint.
            failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
            # PBT clones other trials' checkpoints: keep them all (Tune warns about <= 2).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if uses_pbt(cfg) else 2),
        ),
    )


def _record_unfinished(plan: SweepPlan) -> None:
    """A sweep that did not finish: its parent run and marker say how it ended, and the journal gets
    one quick flush (what the store does not take now stays kept for --resume or `physfarm report`)."""
    if plan.tracker.parent_run_id is None or plan.status is SweepStatus.FINISHED:
        return
    if plan.status is SweepStatus.FAILED:  # nothing ran: a new start may follow
        plan.tracker.finish(None, "FAILED")
    else:
        plan.tracker.interrupt()
    write_marker(plan.folder, status=plan.status.value)
    _end_journal(plan.journal, plan.name, 0.0, plan.folder)


def _replay_before_resume(journal, marker: dict, folder: Path) -> None:
    """A resume first replays MLflow writes an earlier run of the sweep kept (the store was down), so
    the parent and child runs it looks up exist and hold everything."""
    if journal.pending and not journal.flush(wait_s=10.0):
        raise ConnectionError(f"MLflow tracking store {journal.uri} does not take the {journal.pending} writes "
                              f"kept in {journal.path}; start it (or fix it) and resume again")
    parent = journal.resolve(marker.get("parent_run_id", ""))
    if parent.startswith(PLACEHOLDER):
        raise ConnectionError(f"sweep's parent run was never written to {journal.uri} and {journal.path} does "
                              f"not hold its creation; start a new sweep under another sweep.name")
    if parent != marker.get("parent_run_id"):
        write_marker(folder, parent_run_id=parent)
        marker["parent_run_id"] = parent


def _end_journal(journal, name: str, wait_s: float, folder: Path) -> int:
    """Flush what the journal kept; if the store is still down, say so and how to replay. Returns
    the writes still pending."""
    if not journal.pending or journal.flush(wait_s=wait_s):
        return 0
    print(f"physfarm: MLflow tracking store {journal.uri} is still unreachable at the end of sweep '{name}': "
          f"{journal.pending} MLflow writes are kept in {journal.path}. Nothing is lost: once the store "
          f"answers, `physfarm report --journal {journal.path}` (or `physfarm sweep CONFIG --resume`) "
          f"replays them.", file=sys.stderr, flush=True)
    write_marker(folder, journal_pending=journal.pending)
    return journal.pending


def _stopped_early(plan: SweepPlan, seen: int) -> bool:
    """Did Tune stop before every trial ended (Ctrl-C, SIGTERM)? Tune's last saved experiment state
    tells (its live trial objects are cleaned up by now); trials never created count too."""
    expected = plan.expected if plan.expected is not None else expected_trials(plan.cfg)
    if seen < expected:
        return True
    if not plan.saved:  # no readable state: take it that it ended
        return False
    return len(plan.saved) < expected or any(t.status not in ("TERMINATED", "ERROR") for t in plan.saved.values())


def _leaf_paths(node: dict, prefix: str = "") -> list[str]:
    from .space import is_sampler

    out = []
    for k, v in node.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and not is_sampler(v):
            out += _leaf_paths(v, path)
        else:
            out.append(path)
    return out


def _sampled_keys(cfg: FarmConfig) -> list[str]:
    """Leaderboard columns: the sampled train keys, a method section's keys without the section."""
    from trainers.registry import METHODS

    keys = []
    for path in cfg.sampled_paths():
        parts = path.split(".")[1:]
        if len(parts) > 1 and parts[0] in METHODS:
            parts = parts[1:]
        key = ".".join(parts)
        if key not in keys:
            keys.append(key)
    return keys


def _row_json(rank: int, row: TrialRow, metric: str) -> dict:
    return {"rank": rank, "trial_id": row.trial_id, "run_id": row.run_id, "status": row.status,
            "config": row.config, metric: selected_value(row.metrics, metric),
            "test_accuracy": row.metrics.get("test_accuracy"), "selected_epoch": row.metrics.get("selected_epoch"),
            "epoch": row.metrics.get("epoch"), "device_s_total": row.metrics.get("device_s_total"), "error": row.error}


__all__ = ["run_sweep", "prepare", "run", "collect", "finish", "SweepPlan", "SweepStatus", "SweepOutcome", "TrialRow", "init_ray", "check_resumable", "read_marker", "PARENT_TAG"]
