"""What a sweep's folder says of it: physfarm's marker file (`physfarm_sweep.json`: parent run,
store, config digest, status, device budget spent, fidelity promotions), Tune's saved trials, and
the sweep's child runs in MLflow."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .mlflow_ops import is_outage

MARKER = "physfarm_sweep.json"


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


def child_runs(tracker, journal) -> dict:
    """{trial id: child run id}; while the store is down, the runs this process knows (placeholders
    for runs created during the outage: a kept write naming one gets its real id on replay)."""
    known = {tid: journal.resolve(run) for tid, run in journal.trial_runs.items()}
    if journal.pending:
        return known
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
