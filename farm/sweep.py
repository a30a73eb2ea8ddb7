"""A sweep: Ray Tune over trainings that share the device pool, tracked in MLflow."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import tune

from .config import FarmConfig
from .pool import find_device, start_device, stop_device
from .space import to_param_space
from .tracking import MLflowCallback, SweepTracker, check_reachable, resolve_tracking_uri
from .trainable import run_trial


@dataclass
class TrialRow:
    trial_id: str
    config: dict  # the sampled values, by dotted path
    metrics: dict
    status: str
    error: str | None = None


@dataclass
class SweepOutcome:
    name: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    rows: list[TrialRow] = field(default_factory=list)
    storage_path: str = ""

    def leaderboard(self, metric: str = "test_accuracy", mode: str = "max") -> list[TrialRow]:
        """Finished trials best first, then the others."""
        def key(row: TrialRow):
            value = row.metrics.get(metric)
            if row.status != "TERMINATED" or not isinstance(value, (int, float)):
                return (1, 0.0)
            return (0, -value if mode == "max" else value)
        return sorted(self.rows, key=key)


def _last_line(error: BaseException) -> str:
    """The exception's own message (Ray wraps it in a traceback whose first line says nothing)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, namespace="physfarm", log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=os.cpu_count(), namespace="physfarm", include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)


def _pick(config: dict, path: str):
    node = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_sweep(cfg: FarmConfig, address: str | None = None, tracking_uri: str | None = None,
              name: str | None = None, verbose: int = 0) -> SweepOutcome:
    uri = resolve_tracking_uri(tracking_uri, cfg.tracking.uri)
    check_reachable(uri)
    name = name or cfg.sweep.name or "sweep"
    storage = str(Path(cfg.sweep.storage_path or "ray_results").expanduser().resolve())
    init_ray(address)

    # Devices this sweep starts live as long as their handles: keep them until the sweep ends.
    started: list[tuple] = []
    for dev in cfg.devices:
        if find_device(dev.name) is None:  # a standing device of that name is used as it is
            started.append((dev, start_device(dev)))
    tracker = SweepTracker(uri, cfg.tracking.experiment, name)
    parent = tracker.start(cfg.model_dump(mode="json"), [d.model_dump(mode="json") for d in cfg.devices])
    callback = MLflowCallback(uri, tracker.experiment_id, parent, name)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=cfg.data.model_dump(mode="json")),
        {"cpu": cfg.sweep.trial_cpus},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"train": to_param_space(cfg.train)},
        tune_config=tune.TuneConfig(
            metric=cfg.sweep.metric, mode=cfg.sweep.mode, num_samples=cfg.sweep.num_samples,
            max_concurrent_trials=cfg.sweep.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, callbacks=[callback], verbose=verbose,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )
    status = "FAILED"
    try:
        grid = tuner.fit()
        status = "FINISHED"
    finally:
        for dev, _handles in started:
            stop_device(dev.name, dev.replicas)
        if status != "FINISHED":
            tracker.finish(None, "FAILED")
    paths = list(cfg.sampled_paths())
    outcome = SweepOutcome(name, uri, cfg.tracking.experiment, parent, storage_path=storage)
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        outcome.rows.append(TrialRow(
            trial_id=trial_id,
            config={p.removeprefix("train."): _pick(result.config, p) for p in paths},
            metrics=dict(result.metrics or {}),
            status="ERROR" if result.error else "TERMINATED",
            error=_last_line(result.error) if result.error else None,
        ))
    board = outcome.leaderboard(cfg.sweep.metric, cfg.sweep.mode)
    best = board[0] if board and board[0].status == "TERMINATED" else None
    tracker.finish({"trial_id": best.trial_id, "metrics": best.metrics} if best else None)
    return outcome
