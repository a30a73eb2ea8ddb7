"""The sweep's search and scheduler settings, and the checks that tie them to `train` (no Ray here:
`physfarm sweep --check` validates a config without importing Ray Tune; farm.tuning builds the Tune
objects from these)."""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError, join_path
from .space import FORMS, check_sampler, is_sampler

if TYPE_CHECKING:
    from .config import FarmConfig

TIME_ATTRS = ("training_iteration", "epoch", "device_s_total", "device_s", "time_total_s")
ASHA_FIELDS = ("max_t", "grace_period", "reduction_factor", "brackets")
FIDELITY_FIELDS = ("screen", "promote", "keep", "screen_epochs", "fidelity1_epochs")  # defaults: farm.fidelity
PBT_FIELDS = ("perturbation_interval", "burn_in_period", "hyperparam_mutations", "quantile_fraction",
              "resample_probability", "synch")
OPTUNA_EXTRA = "pip install 'physfarm[optuna]' (or: pip install optuna)"


class SchedulerSettings(BaseModel):
    """A Tune trial scheduler: ASHA (early stopping) or PBT (population based training)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["asha", "pbt", "multifidelity"]
    time_attr: Literal["training_iteration", "epoch", "device_s_total", "device_s", "time_total_s"] = Field(
        default="training_iteration",
        description="what a trial's progress is measured in: epochs (training_iteration or epoch), "
                    "device seconds this trial used so far (device_s_total; device_s is the same) or wall-clock "
                    "seconds (time_total_s)")
    # ASHA
    max_t: float | None = Field(default=None, gt=0, description="asha: stop every trial at this time "
                                "(default: train.epochs when time_attr counts epochs)")
    grace_period: float | None = Field(default=None, gt=0, description="asha: no trial stops before (default 1)")
    reduction_factor: float | None = Field(default=None, gt=1, description="asha: keep 1/this per rung (default 4)")
    brackets: int | None = Field(default=None, ge=1, le=16, description="asha: brackets (default 1)")
    # multifidelity (farm.fidelity): screen in silico, promote to PAT on the device, ASHA on device_s
    screen: int | None = Field(default=None, ge=1, le=100_000,
                               description="multifidelity: configurations trained in silico on the twin "
                               "(fidelity 0; default: all the search space gives)")
    promote: int | None = Field(default=None, ge=1, le=100_000,
                                description="multifidelity: the best screened, by validation accuracy "
                                "measured on the device, promoted to PAT on the device (fidelity 1)")
    keep: int | None = Field(default=None, ge=1, le=100_000,
                             description="multifidelity: of the promoted, about this many are kept by "
                             "ASHA on device seconds to full PAT (fidelity 2); sets reduction_factor = "
                             "promote / keep")
    screen_epochs: int | None = Field(default=None, ge=1, le=100_000,
                                      description="multifidelity: in-silico epochs (default: train.epochs)")
    fidelity1_epochs: float | None = Field(
        default=None, gt=0, le=100_000, description="multifidelity: PAT epochs every promoted trial gets "
        "before ASHA compares them (its grace_period, in device seconds, is this many epochs as the "
        "screen measured them; grace_period given instead sets it in seconds)")
    # PBT
    perturbation_interval: float | None = Field(default=None, gt=0,
                                                description="pbt: exploit/explore every this much time_attr")
    burn_in_period: float | None = Field(default=None, ge=0, description="pbt: no perturbation before (default 0)")
    hyperparam_mutations: dict[str, Any] | None = Field(
        default=None, description="pbt: train fields to mutate: a list of values or a search space each")
    quantile_fraction: float | None = Field(default=None, gt=0, le=0.5,
                                            description="pbt: bottom fraction that clones the top (default 0.25)")
    resample_probability: float | None = Field(default=None, ge=0, le=1,
                                               description="pbt: chance to resample instead of perturb (default 0.25)")
    synch: bool | None = Field(default=None, description="pbt: perturb all trials together at each interval "
                               "(they wait for each other; default false: each trial on its own)")


def _flat_mutations(node: dict, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        path = join_path(prefix, key)
        if isinstance(value, dict) and not is_sampler(value):
            out.update(_flat_mutations(value, path))
        else:
            out[path] = value
    return out


def mutation_space(sched: SchedulerSettings) -> dict[str, tuple[str, list]]:
    """PBT's mutations as {train path: (form, args)}, each checked; ConfigError names the key."""
    where = "sweep.scheduler.hyperparam_mutations"
    found = {}
    for key, value in _flat_mutations(sched.hyperparam_mutations or {}, "").items():
        here = f"{where}.{key}"
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{here}: an empty list; give the values to choose from")
            found[f"train.{key}"] = ("choice", value)
        elif is_sampler(value):
            form, args = next(iter(value.items()))
            if form == "grid":
                raise ConfigError(f"{here}: 'grid' cannot be mutated; use a list of values or one of "
                                  f"{', '.join(f for f in FORMS if f != 'grid')}")
            check_sampler(here, form, args)
            found[f"train.{key}"] = (form, args)
        else:
            raise ConfigError(f"{here}: give a list of values or a search space "
                              f"({', '.join(f for f in FORMS if f != 'grid')}); got {value!r}")
    return found


def check_sweep(cfg: "FarmConfig") -> dict[str, tuple[str, list]]:
    """Sweep settings that depend on each other and on `train`; returns PBT's mutation space."""
    sw = cfg.sweep
    names = [d.name for d in cfg.devices]
    if sw.search == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise ConfigError(f"sweep.search: 'optuna' needs the optuna package, which is not installed: "
                              f"{OPTUNA_EXTRA}")
        from .space import samplers

        for path, (form, _args) in samplers(cfg.train, "train").items():
            if form == "grid":
                raise ConfigError(f"{path}: 'grid' cannot be used with sweep.search: optuna (Optuna samples "
                                  f"points one at a time); use 'choice' instead")
    if isinstance(sw.max_trials_per_device, dict):
        for dev in sw.max_trials_per_device:
            if dev not in names:
                raise ConfigError(f"sweep.max_trials_per_device.{dev}: not a configured device; one of {names}")
    sched = sw.scheduler
    if sched is None:
        return {}
    where = "sweep.scheduler"
    own = {"asha": ASHA_FIELDS, "pbt": PBT_FIELDS,
           "multifidelity": FIDELITY_FIELDS + ("max_t", "grace_period")}[sched.kind]
    for field in ASHA_FIELDS + PBT_FIELDS + FIDELITY_FIELDS:
        if field not in own and getattr(sched, field) is not None:
            raise ConfigError(f"{where}.{field}: not a setting of kind '{sched.kind}'; its settings: "
                              f"time_attr, {', '.join(own)}")
    if sched.kind == "multifidelity":
        from .fidelity import check_fidelity

        check_fidelity(cfg)
        return {}
    if sched.kind == "asha":
        if sched.time_attr in ("device_s_total", "device_s", "time_total_s") and sched.max_t is None:
            raise ConfigError(f"{where}.max_t: required when time_attr is {sched.time_attr} "
                              f"(the seconds after which every trial stops)")
        if sched.max_t is not None and (sched.grace_period or 1) > sched.max_t:
            raise ConfigError(f"{where}.grace_period: must not exceed max_t ({sched.max_t})")
        return {}
    if sched.perturbation_interval is None:
        raise ConfigError(f"{where}.perturbation_interval: required for kind 'pbt' "
                          f"(in units of time_attr, e.g. 1 = every epoch)")
    if not sched.hyperparam_mutations:
        raise ConfigError(f"{where}.hyperparam_mutations: required for kind 'pbt', e.g. "
                          f"{{lr: {{loguniform: [0.001, 0.1]}}}}")
    if sw.search != "default":
        raise ConfigError("sweep.search: PBT searches by itself (it mutates hyperparam_mutations); "
                          "use the default search with scheduler kind 'pbt'")
    return mutation_space(sched)
