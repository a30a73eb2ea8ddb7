"""A sweep's folder (<storage_path>/<name>) and what it says of the sweep: physfarm's marker file,
physfarm_sweep.json (parent run, store, config digest, status, start time, device budget spent, fidelity
promotions), Tune's saved trials and the sweep's child runs in MLflow; and the checks made before
anything starts (Ray Tune and MLflow are imported only by the functions that read them)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .config import FarmConfig
from .errors import ConfigError

MARKER = "physfarm_sweep.json"


def sweep_name(cfg: FarmConfig, name: str | None = None) -> str:
    return name or cfg.sweep.name or "sweep"


def storage_path(cfg: FarmConfig) -> str:
    return str(Path(cfg.sweep.storage_path or "ray_results").expanduser().resolve())


def config_digest(cfg: FarmConfig) -> str:
    """What a resume must not change: the trials' search space, the data and the sweep settings."""
    sweep = cfg.sweep.model_dump(mode="json")
    sweep.pop("storage_path", None)
    if sweep.get("max_failures") == 2:  # the default: digests of sweeps started before the field existed hold
        sweep.pop("max_failures")
    blob = json.dumps({"train": cfg.train, "data": cfg.data.model_dump(mode="json"), "sweep": sweep},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_marker(folder: Path) -> dict | None:
    path = Path(folder) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_marker(folder: Path, **values) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = read_marker(folder) or {}
    data.update(values, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(folder / MARKER)


def sweep_step(started: float) -> int:
    """The MLflow step of a sweep-level figure (device budget, devices' utilisation) logged now: whole
    seconds since the sweep first started (wall clock; the marker's `started_at`), one clock for all of
    the sweep's Tune runs and resumes, so a later figure always has a later step."""
    return max(0, int(time.time() - started))


def reset_marker(folder: Path) -> None:
    """Forget the marker of an earlier, finished sweep in `folder` (a new sweep of the same name starts)."""
    (Path(folder) / MARKER).unlink(missing_ok=True)


def check_resumable(cfg: FarmConfig, uri: str, name: str, resume: bool) -> dict | None:
    """Before anything starts: a resume needs the earlier sweep, its store and the same config; a new
    sweep must not overwrite an interrupted one. Returns the marker when resuming."""
    folder = Path(storage_path(cfg)) / name
    marker = read_marker(folder)
    if resume:
        from ray import tune

        if marker is None or not tune.Tuner.can_restore(str(folder)):
            raise ConfigError(f"--resume: no sweep '{name}' to resume in {folder.parent} "
                              f"(sweep.name and sweep.storage_path pick it)")
        if marker.get("tracking_uri") != uri:
            raise ConfigError(f"--resume: sweep '{name}' was tracked in {marker.get('tracking_uri')}, not {uri}; "
                              f"resume with --tracking-uri {marker.get('tracking_uri')}")
        if marker.get("config_digest") != config_digest(cfg):
            raise ConfigError(f"--resume: the config's train, data or sweep section differs from the one sweep "
                              f"'{name}' started with; resume with the same file, or start a new sweep "
                              f"(another sweep.name)")
        return marker
    if marker is not None and marker.get("status") in ("running", "interrupted"):
        raise ConfigError(f"sweep '{name}' in {folder} did not finish ({marker.get('status')}): continue it "
                          f"with --resume, or start a new one under another sweep.name (or delete that folder)")
    return None


def child_runs(tracker, journal) -> dict:
    """{trial id: child run id}; while the store is down, the runs this process knows (placeholders
    for runs created during the outage: a kept write naming one gets its real id on replay)."""
    known = {tid: journal.resolve(run) for tid, run in journal.trial_runs.items()}
    if journal.pending:
        return known
    from .mlflow_ops import is_outage

    try:
        return {**known, **{r.data.tags.get("physfarm.trial_id"): r.info.run_id for r in tracker.children()}}
    except Exception as err:  # noqa: BLE001
        if not is_outage(err):
            raise
        return known


def saved_trials(folder: Path) -> dict:
    """{trial id: trial} from Tune's last saved experiment state (public ExperimentAnalysis): each
    trial's status (PENDING/RUNNING/PAUSED: unfinished) and result folder; {} when none is readable."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t for t in ExperimentAnalysis(str(folder)).trials}
    except Exception:  # noqa: BLE001 - no readable state
        return {}
