"""How a sweep searches and schedules: Tune's search algorithms and schedulers from the config, and a
device-aware scheduler that caps the trials running on each device at once.

    sweep:
      search: optuna                     # default: Tune's own (grid and random sampling)
      scheduler: {kind: asha, time_attr: device_s_total, max_t: 30, grace_period: 5}
      max_trials_per_device: {optics: 1} # or one number for every device
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .errors import ConfigError
from .space import is_sampler, to_tune
from .sweep_settings import OPTUNA_EXTRA
from .trainspec import for_method, methods_of, resolved_config, trial_device

if TYPE_CHECKING:
    from .config import FarmConfig


# ----------------------------------------------------------------------------------------------------
# Building Tune objects
# ----------------------------------------------------------------------------------------------------
def result_key(time_attr: str) -> str:
    """The reported metric a scheduler's time_attr reads (`device_s` is the trial's device_s_total)."""
    return "device_s_total" if time_attr == "device_s" else time_attr


# ----------------------------------------------------------------------------------------------------
def device_names(cfg: "FarmConfig") -> list[str]:
    return [d.name for d in cfg.devices]


def build_param_space(cfg: "FarmConfig") -> dict:
    """Tune's param_space. A grid over methods becomes one grid branch per method, each with only its
    own section merged in, so a search space in one method's section multiplies only that method's
    trials (Tune expands grids nested in grid values)."""
    from .space import to_param_space

    train = cfg.train
    value = train.get("method")
    if cfg.sweep.search == "default" and is_sampler(value) and "grid" in value:
        branches = [to_param_space(for_method(train, name)) for name in methods_of(train)]
        return {"train": tune.grid_search(branches)}
    return {"train": to_param_space(train)}


def _max_epochs(cfg: "FarmConfig") -> int:
    from .trainspec import cases

    devices = device_names(cfg)
    return max(int(resolved_config(c, devices)["epochs"]) for c in cases(cfg.train))


def _mutations_to_tune(node: dict) -> dict:
    out = {}
    for key, value in node.items():
        if is_sampler(value):
            form, args = next(iter(value.items()))
            out[key] = to_tune(form, args)
        elif isinstance(value, dict):
            out[key] = _mutations_to_tune(value)
        else:
            out[key] = list(value)
    return out


def build_scheduler(cfg: "FarmConfig") -> TrialScheduler | None:
    from ray.tune.schedulers import AsyncHyperBandScheduler, PopulationBasedTraining

    sched = cfg.sweep.scheduler
    inner: TrialScheduler | None = None
    if sched is not None and sched.kind == "asha":
        counts_epochs = sched.time_attr in ("training_iteration", "epoch")
        inner = AsyncHyperBandScheduler(
            time_attr=result_key(sched.time_attr),
            max_t=sched.max_t if sched.max_t is not None else (_max_epochs(cfg) if counts_epochs else 100),
            grace_period=sched.grace_period or 1, reduction_factor=sched.reduction_factor or 4,
            brackets=sched.brackets or 1,
        )
    elif sched is not None and sched.kind == "pbt":
        inner = PopulationBasedTraining(
            time_attr=result_key(sched.time_attr), perturbation_interval=sched.perturbation_interval,
            burn_in_period=sched.burn_in_period or 0.0,
            hyperparam_mutations={"train": _mutations_to_tune(sched.hyperparam_mutations or {})},
            quantile_fraction=sched.quantile_fraction or 0.25,
            resample_probability=sched.resample_probability if sched.resample_probability is not None else 0.25,
            synch=bool(sched.synch),
        )
    limits = device_limits(cfg)
    if limits:
        return DeviceLimitScheduler(inner or FIFOScheduler(), limits, device_names(cfg))
    return inner


def build_search(cfg: "FarmConfig"):
    sw = cfg.sweep
    if sw.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as err:  # checked with the config already; a worker may still lack it
            raise ConfigError(f"sweep.search: 'optuna' needs the optuna package: {OPTUNA_EXTRA} ({err})") from None
        return OptunaSearch(seed=sw.seed)
    if sw.seed is not None:
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=sw.seed)
    return None


def device_limits(cfg: "FarmConfig") -> dict[str, int]:
    value = cfg.sweep.max_trials_per_device
    if value is None:
        return {}
    if isinstance(value, int):
        return {name: value for name in device_names(cfg)}
    return dict(value)


# ----------------------------------------------------------------------------------------------------
# Device-aware scheduling
# ----------------------------------------------------------------------------------------------------
class _Visible:
    """The controller as the inner scheduler sees it: waiting trials of full devices are hidden."""

    def __init__(self, controller, hidden: set):
        self._controller = controller
        self._hidden = hidden

    def get_trials(self):
        return [t for t in self._controller.get_trials() if t not in self._hidden]

    def __getattr__(self, name):
        return getattr(self._controller, name)


class DeviceLimitScheduler(TrialScheduler):
    """Wraps a Tune scheduler (FIFO, ASHA, PBT) so that at most `limits[device]` trials run on a device
    at once, whatever the search algorithm and however many devices a sweep mixes.

    A trial added while its device is full is set PAUSED before Tune requests resources for it (so it
    holds no CPU while it waits); the wrapped scheduler only sees it again once a trial on that device
    ends. Trials on other devices are not held up. Counted as running on a device: RUNNING and
    PENDING trials (Tune is starting those).
    """

    def __init__(self, inner: TrialScheduler, limits: dict[str, int], devices: list[str]):
        super().__init__()
        self.inner = inner
        self.limits = dict(limits)
        self.devices = list(devices)
        self._seen: set[str] = set()
        self._device_of: dict[str, str | None] = {}

    # who runs where
    def device_of(self, trial: Trial) -> str | None:
        if trial.trial_id not in self._device_of:
            self._device_of[trial.trial_id] = trial_device(dict(trial.config.get("train", {})), self.devices)
        return self._device_of[trial.trial_id]

    def busy(self, controller, device: str, exclude: Trial | None = None) -> int:
        return sum(1 for t in controller.get_trials()
                   if t is not exclude and t.status in (Trial.RUNNING, Trial.PENDING) and self.device_of(t) == device)

    def full(self, controller, device: str | None, exclude: Trial | None = None) -> bool:
        cap = self.limits.get(device) if device is not None else None
        return cap is not None and self.busy(controller, device, exclude) >= cap

    # TrialScheduler
    @property
    def metric(self):
        return self.inner.metric

    @property
    def supports_buffered_results(self):
        return self.inner.supports_buffered_results

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller, trial: Trial):
        self.inner.on_trial_add(tune_controller, trial)
        if trial.trial_id in self._seen:  # a requeued trial: Tune tracks its status already
            return
        self._seen.add(trial.trial_id)
        if trial.status == Trial.PENDING and self.full(tune_controller, self.device_of(trial), exclude=trial):
            trial.set_status(Trial.PAUSED)  # before Tune files it: it waits without resources

    def on_trial_error(self, tune_controller, trial: Trial):
        self.inner.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        return self.inner.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict):
        self.inner.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial: Trial):
        self.inner.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        hidden = {t for t in tune_controller.get_trials()
                  if t.status == Trial.PAUSED and self.full(tune_controller, self.device_of(t))}
        return self.inner.choose_trial_to_run(_Visible(tune_controller, hidden) if hidden else tune_controller)

    def debug_string(self) -> str:
        caps = ", ".join(f"{d}<={n}" for d, n in sorted(self.limits.items()))
        return f"{self.inner.debug_string()} | trials per device: {caps}"

    def save(self, checkpoint_path: str):
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str):
        self.inner.restore(checkpoint_path)


def uses_pbt(cfg: "FarmConfig") -> bool:
    return cfg.sweep.scheduler is not None and cfg.sweep.scheduler.kind == "pbt"


__all__ = ["build_param_space", "build_scheduler", "build_search", "DeviceLimitScheduler", "device_limits",
           "uses_pbt"]
