"""The multifidelity strategy's two Tune runs (farm.fidelity says what each fidelity is).

`run_phases(plan, make_tuner)` is what farm.sweep.run calls in place of one Tuner: fidelity 0 for
every screened configuration, then the promoted ones (PAT or PhyLL, ranked together) on the device
under ASHA on device seconds. Returns the results of both runs (screened first), which farm.sweep.collect turns into one
row per child run.
"""
from __future__ import annotations

from pathlib import Path

from ray import tune

from .data import DataConfig, load_dataset
from .fidelity import (PROMOTED, FidelityInfo, epoch_rows, fidelity_plan, grace_seconds, max_t_default, n_rungs,
                       promote)
from .sweep_folder import child_runs, saved_trials, write_marker
from .trainspec import expected_trials, resolved_config
from .tuning import DeviceLimitScheduler, build_param_space, build_scheduler, build_search, device_limits


def run_phases(plan, make_tuner) -> list:
    cfg = plan.cfg
    fp = fidelity_plan(cfg)
    sweep = cfg.sweep
    # ---- fidelity 0: every screened configuration, in silico; validation measured on the device
    space = build_param_space(cfg)
    space["fidelity"] = {"stage": 0, "epochs": fp.screen_epochs}
    first = make_tuner(param_space=space, scheduler=build_scheduler(cfg), search=build_search(cfg),
                       num_samples=fp.screen or sweep.num_samples, fidelity=FidelityInfo(stage=0),
                       title=f"sweep '{plan.name}', fidelity 0 (in silico)")
    screened = list(first.fit())
    plan.saved = saved_trials(plan.folder)
    n_screened = fp.screen or expected_trials(cfg)
    rows = [(_trial_id(r), dict(r.metrics or {}), r) for r in screened]
    # screened and usable: ended with a checkpoint (a trial that failed, or met a recurring error, is not)
    done = [(tid, m, r) for tid, m, r in rows if not r.error and m.get("epoch") is not None and r.checkpoint]
    plan.expected = n_screened + min(fp.promote, len(done))
    figures = _budget(plan)
    if figures is not None and figures["remaining_s"] <= 0:
        return screened  # the budget ended with the screen: nothing is promoted
    unfinished = len(screened) < n_screened or any(
        t.status not in ("TERMINATED", "ERROR") for t in plan.saved.values())
    if unfinished or not done:
        return screened  # interrupted: a resume finishes the screen first
    # ---- promotion: the best by their selected validation accuracy on the device, whatever their method
    chosen = promote([(tid, m) for tid, m, _ in done], fp.promote, sweep.metric, sweep.mode)
    by_id = {tid: (m, r) for tid, m, r in done}
    runs = child_runs(plan.tracker, plan.journal)
    for tid, _m, _r in done:
        if tid in runs:
            plan.journal.call("set_tag", run=runs[tid], key="physfarm.promoted", value=str(tid in chosen).lower())
    cases, sources = [], {}
    for tid in chosen:
        metrics, result = by_id[tid]
        train = dict((result.config or {}).get("train", {}))
        train.pop("init_from", None)
        folder = str(Path(result.checkpoint.path))
        cases.append({**train, "init_from": folder})
        sources[folder] = {"run_id": plan.journal.resolve(runs.get(tid, "")) if runs.get(tid) else "",
                           "trial_id": tid, "device_s": float(metrics.get("device_s_total", 0.0) or 0.0)}
    resolved = [resolved_config(c, plan.devices) for c in cases]
    grace = fp.grace_period
    if not grace:
        data = load_dataset(DataConfig(**cfg.data.model_dump(mode="json")))
        rows = max(epoch_rows(r, len(data.y_train), len(data.y_val), data.n_classes) for r in resolved)
        grace = grace_seconds([m for m, _ in by_id.values()], rows, fp.fidelity1_epochs)
    epochs = max(int(r["epochs"]) for r in resolved)
    max_t = fp.max_t or max_t_default(grace, epochs, fp.fidelity1_epochs)
    write_marker(plan.folder, fidelity={"promoted": chosen, "grace_s": grace, "max_t": max_t,
                                        "screened": len(done)})
    # ---- fidelities 1 and 2: each its method on the device from its fidelity-0 weights, ASHA on device seconds
    inner = None
    if fp.keep < fp.promote and n_rungs(grace, max_t, fp.reduction_factor) > 0:
        from ray.tune.schedulers import AsyncHyperBandScheduler

        inner = AsyncHyperBandScheduler(time_attr="device_s_total", max_t=max_t, grace_period=grace,
                                        reduction_factor=fp.reduction_factor, brackets=1)
    limits = device_limits(cfg)
    scheduler = DeviceLimitScheduler(inner or tune.schedulers.FIFOScheduler(), limits, plan.devices) \
        if limits else inner
    folder = plan.folder / f"{plan.name}.{PROMOTED}"
    info = FidelityInfo(stage=1, grace_s=grace, experiment_id=plan.tracker.experiment_id, sources=sources)
    # restored only by a resume of a sweep that had got this far (its marker said so): a folder left by
    # an earlier, finished sweep of the same name is not this sweep's promoted run
    resuming = bool(plan.marker and plan.marker.get("fidelity"))
    second = make_tuner(folder=folder, restore=resuming and tune.Tuner.can_restore(str(folder)),
                        param_space={"train": tune.grid_search(cases)}, scheduler=scheduler, num_samples=1,
                        fidelity=info, title=f"sweep '{plan.name}', fidelities 1-2 (on the device)")
    promoted = list(second.fit())
    plan.saved = {**plan.saved, **saved_trials(folder)}
    return screened + promoted


def _trial_id(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def _budget(plan) -> dict | None:
    from . import budget as budgets

    return budgets.budget_figures(plan.name) if plan.cfg.sweep.device_budget_s else None


__all__ = ["run_phases"]
