"""The multifidelity sweep strategy: screen on the twin, promote the best to their method on the
device, and early-stop those on device seconds (`sweep.scheduler: {kind: multifidelity, ...}`).

Fidelities of one configuration (its method: PAT or PhyLL, `SCREENS`; a sweep may mix them):
  0  training with the twin standing in for the device: PAT's configurations as `insilico` with
     `device_val: selected`, PhyLL's as PhyLL with `in_silico` (forward passes on the twin). Epochs
     are selected on the twin's validation; the device measures the validation split once, on the
     selected weights, and any twin data collection. `screen_epochs` epochs, no test pass;
  1  the configuration's method on the device warm-started from its fidelity-0 weights
     (`train.init_from`), until `grace_period` device seconds (about `fidelity1_epochs` epochs);
  2  the full training: the promoted trials ASHA keeps past its first rung (time_attr device_s_total).

A sweep runs in two Tune runs under the one parent MLflow run: fidelity 0 for every screened
configuration (the sweep's Tune experiment, <storage>/<name>), then, from its results, the `promote`
best by validation accuracy measured on the device (whatever their method: ranked together), under
ASHA (reduction_factor = promote / keep) in <storage>/<name>/<name>.promoted. A resume restores the
first run (finished: nothing reruns), picks the same promotions from its results, and restores or
starts the second.

No Ray here except what the phase runner (`run_phases`) needs; `check_fidelity` runs in --check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import FarmConfig

# Defaults of the strategy, chosen by bench/fidelity.py (bench/results/M1.json, details.defaults_choice:
# among the settings tried, the one with the fewest device seconds whose selected configuration's
# validation accuracy was within 1 point of the full grid's, on plate and shg).
FIDELITY_DEFAULTS = {"promote": 2, "keep": 1, "fidelity1_epochs": 1.0}
PROMOTED = "promoted"  # the second Tune run's experiment name is <sweep>.promoted
# What fidelity 0 sets in a configuration's train section, by its method: the methods with a form
# trained on the twin (and a warm start from it). Others (digital: no device in the loop) are refused.
SCREENS: dict[str, dict] = {"pat": {"method": "insilico", "device_val": "selected"},
                            "phyll": {"in_silico": True}}
TWIN_METHODS = tuple(SCREENS)  # methods a sweep of this strategy may run


# ----------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FidelityPlan:
    screen: int | None      # None: every configuration the search space gives
    promote: int
    keep: int
    screen_epochs: int | None  # None: train.epochs
    fidelity1_epochs: float
    grace_period: float | None  # device seconds; None: fidelity1_epochs as the screen measured them
    max_t: float | None

    @property
    def reduction_factor(self) -> float:
        return self.promote / self.keep


def fidelity_plan(cfg: "FarmConfig") -> FidelityPlan | None:
    sched = cfg.sweep.scheduler
    if sched is None or sched.kind != "multifidelity":
        return None
    d = FIDELITY_DEFAULTS
    return FidelityPlan(screen=sched.screen, promote=sched.promote or d["promote"], keep=sched.keep or d["keep"],
                        screen_epochs=sched.screen_epochs, fidelity1_epochs=sched.fidelity1_epochs or d["fidelity1_epochs"],
                        grace_period=sched.grace_period, max_t=sched.max_t)


def check_fidelity(cfg: "FarmConfig") -> None:
    """The strategy's settings against each other and against `train` (ConfigError naming the field)."""
    from .trainspec import expected_trials, for_method, methods_of

    sched, where = cfg.sweep.scheduler, "sweep.scheduler"
    plan = fidelity_plan(cfg)
    if "time_attr" in sched.model_fields_set and sched.time_attr not in ("device_s", "device_s_total"):
        raise ConfigError(f"{where}.time_attr: '{sched.time_attr}' with kind 'multifidelity', which early-stops "
                          f"its promoted trials on device seconds; use time_attr: device_s (or leave it out)")
    methods = methods_of(cfg.train)
    bad = [m for m in methods if m not in TWIN_METHODS]
    if bad:
        raise ConfigError(f"train.method: '{bad[0]}' with sweep.scheduler kind 'multifidelity', which screens "
                          f"every configuration with a twin standing in for the device and promotes the best "
                          f"to their method on the device; '{bad[0]}' has no form trained on a twin. Allowed: "
                          f"{', '.join(TWIN_METHODS)} (mixed freely). Sweep other methods in a sweep of their "
                          f"own (scheduler asha)")
    for m in methods:
        if "in_silico" in for_method(cfg.train, m):
            key = f"train.{m}.in_silico" if "in_silico" in (cfg.train.get(m) or {}) else "train.in_silico"
            raise ConfigError(f"{key}: set by sweep.scheduler kind 'multifidelity' itself (fidelity 0 on the "
                              f"twin, the promoted on the device); leave it out")
    n = expected_trials(cfg)
    if plan.screen is not None and _has_grid(cfg.train) and plan.screen != n:
        raise ConfigError(f"{where}.screen: {plan.screen}, but the grid in train gives {n} configurations, all "
                          f"of which are screened; leave screen out, or sample with choice/uniform and set screen")
    screened = plan.screen or n
    if plan.promote > screened:
        raise ConfigError(f"{where}.promote: {plan.promote} of {screened} screened configurations; promote "
                          f"at most {screened}")
    if plan.keep > plan.promote:
        raise ConfigError(f"{where}.keep: {plan.keep}, more than the {plan.promote} promoted; keep at most "
                          f"{plan.promote}")
    if plan.max_t is not None and plan.grace_period is not None and plan.grace_period > plan.max_t:
        raise ConfigError(f"{where}.grace_period: must not exceed max_t ({plan.max_t})")


def _has_grid(train: dict) -> bool:
    from .space import samplers

    return any(form == "grid" for form, _ in samplers(train, "train").values())


# ----------------------------------------------------------------------------------------------------
# What a trial trains at each fidelity
# ----------------------------------------------------------------------------------------------------
def at_fidelity(train: dict, fidelity: dict | None) -> dict:
    """A trial's train section as it runs: at fidelity 0 the same network trained with the twin
    standing in for the device (`SCREENS`, by its method), `screen_epochs` epochs, the test split left
    closed."""
    if not fidelity or int(fidelity.get("stage", -1)) != 0:
        return train
    # one device pass per configuration: epochs selected on the twin, the selected weights validated
    # on the device once, after the last
    method = str(train.get("method") or "pat")
    if method not in SCREENS:
        raise ValueError(f"train.method: '{method}' cannot be screened on a twin; allowed: {', '.join(SCREENS)}")
    out = dict(train, **SCREENS[method], final_test=False)
    if fidelity.get("epochs"):
        out["epochs"] = int(fidelity["epochs"])
    return out


def promote(rows: list[tuple[str, dict]], n: int, metric: str = "val_accuracy", mode: str = "max") -> list[str]:
    """The ids of the `n` best screened configurations by their selected (best-epoch) validation
    metric, measured on the device; ties go to the lower id. rows: (trial id, last result)."""
    def key(row):
        tid, metrics = row
        value = metrics.get(f"best_{metric}", metrics.get(metric))
        if not isinstance(value, (int, float)) or value != value:
            return (1, 0.0, tid)
        return (0, -value if mode == "max" else value, tid)

    return [tid for tid, _ in sorted(rows, key=key)[:n]]


def epoch_rows(train: dict, n_train: int, n_val: int, n_classes: int) -> int:
    """Rows one epoch of a promoted configuration measures on the device (`train`: its resolved
    config). PAT: every training row once, and the validation split. PhyLL, per block: positives and
    negatives (2 x n_train), the training rows it evaluates (train_eval_size, each with every
    candidate label; none unsupervised), and the validation split (every candidate label; once
    unsupervised)."""
    if train.get("method") != "phyll":
        return n_train + n_val
    blocks = int(train.get("n_blocks", 1))
    if train.get("unsupervised"):
        return blocks * (2 * n_train + n_val)
    evaluated = min(int(train.get("train_eval_size", 0)), n_train)
    return blocks * (2 * n_train + (evaluated + n_val) * n_classes)


def grace_seconds(screened: list[dict], rows: int, epochs: float) -> float:
    """Device seconds of `epochs` epochs of `rows` measured rows each (`epoch_rows`; the dearest
    promoted configuration's, so ASHA's first rung comes after every method's first epoch), estimated
    from the screen: its validation passes cost device_s_total over device_rows_total measured rows (s
    per row). (Per-call costs make small PAT batches dearer per row: the estimate errs short, and ASHA's
    first rung comes a little early.)"""
    per_row = []
    for m in screened:
        rows = float(m.get("device_rows_total", 0.0) or 0.0)
        if rows > 0 and m.get("device_s_total"):
            per_row.append(float(m["device_s_total"]) / rows)
    if not per_row:
        return 0.0
    per_row.sort()
    return per_row[len(per_row) // 2] * rows * epochs


# ----------------------------------------------------------------------------------------------------
# MLflow: what each child run says of its fidelities
# ----------------------------------------------------------------------------------------------------
@dataclass
class FidelityInfo:
    """What the sweep's MLflow callback needs to tag a trial's run (picklable: Tune keeps callbacks).

    stage 0: the screening run; stage 1: the promoted runs, with their sources by init_from path:
    {checkpoint folder: {"run_id", "trial_id", "device_s"}} and the first rung in device seconds."""

    stage: int
    grace_s: float = 0.0
    experiment_id: str | None = None
    sources: dict[str, dict] = field(default_factory=dict)


def fidelity_tags(info: FidelityInfo | None, train: dict, result: dict) -> dict[str, str]:
    """Tags of one trial's run after a result: the fidelities it ran at, device seconds at each, and
    for a promoted run the run it was warm-started from (id, trial and the UI path)."""
    if info is None:
        return {}
    used = float(result.get("device_s_total", 0.0) or 0.0)
    if info.stage == 0:
        return {"physfarm.fidelities": "0", "physfarm.fidelity": "0",
                "physfarm.device_s.fidelity0": f"{used:.6g}"}
    source = info.sources.get(str(train.get("init_from") or ""), {})
    f1, f2 = min(used, info.grace_s), max(0.0, used - info.grace_s)
    ran = "0,1,2" if f2 > 0 else "0,1"
    tags = {"physfarm.fidelities": ran, "physfarm.fidelity": ran[-1],
            "physfarm.device_s.fidelity0": f"{float(source.get('device_s', 0.0)):.6g}",
            "physfarm.device_s.fidelity1": f"{f1:.6g}", "physfarm.device_s.fidelity2": f"{f2:.6g}"}
    if source.get("run_id"):
        tags.update({"physfarm.warm_start.run_id": source["run_id"],
                     "physfarm.warm_start.trial_id": str(source.get("trial_id", "")),
                     "physfarm.warm_start.url": f"#/experiments/{info.experiment_id}/runs/{source['run_id']}"})
    return tags


def max_t_default(grace_s: float, epochs: int, fidelity1_epochs: float) -> float:
    """ASHA's max_t when none is given: the full run's estimated device seconds (its epochs end a
    trial before that; rungs are grace * rf^k below it)."""
    return max(grace_s, grace_s * epochs / max(fidelity1_epochs, 1e-9)) * 1.05


def n_rungs(grace: float, max_t: float, rf: float) -> int:
    return 0 if grace <= 0 or rf <= 1 else max(0, math.ceil(math.log(max_t / grace, rf)))


__all__ = ["FidelityPlan", "fidelity_plan", "check_fidelity", "at_fidelity", "promote", "epoch_rows", "grace_seconds",
           "FidelityInfo", "fidelity_tags", "max_t_default", "PROMOTED"]
