"""A sweep's device-seconds budget (`sweep.device_budget_s`), enforced before each device call.

The devices already count every client's device seconds (busy time, shared by rows among the
requests of a call: actors/device_stats.py); a sweep's trials are the clients whose id starts with
the sweep's prefix (`<sweep>/...`, farm.trainable). Three parts use that count:

- `DeviceBudget`, a small named Ray actor (one per sweep, no CPU): spent = what the sweep's clients
  used on every device since it started, plus what earlier runs of the sweep spent (a resume);
  `remaining()` asks the devices afresh each time, so it counts every device call that has ended.
- `BudgetGate`, held by each trial's DeviceClient: before each forward call it asks the budget and
  raises `BudgetExhaustedError` when nothing is left. A call that passed the gate may still run while
  the budget ends, so the device is over-used by at most one call per running trial, never more.
- `BudgetStopper`, a Tune stopper: once the budget is spent no trial starts or goes on (stop_all).

A trial stopped by the budget ends normally (TERMINATED) with what it reported and checkpointed up to
its last epoch; `BudgetCallback` logs the remaining seconds on the sweep's parent MLflow run
(`device_budget_remaining_s`, `device_budget_spent_s`) and in the console's view.
"""
from __future__ import annotations

import time

import ray
from ray import tune

from .pool import NAMESPACE
from .sweep_folder import sweep_step


class BudgetExhaustedError(RuntimeError):
    """The sweep's device budget is spent: the trial stops (not retried, not a failure)."""


def budget_actor_name(sweep: str) -> str:
    return f"physfarm-budget:{sweep}"


def sweep_usage(clients: dict, prefixes: tuple[str, ...]) -> dict[str, float]:
    """{device/client: device seconds} of the sweep's clients, as the devices count them now.
    clients: {device name: connected DeviceClient}."""
    out: dict[str, float] = {}
    for name, client in clients.items():
        for cid, usage in client.stats()["clients"].items():
            if cid.startswith(prefixes):
                out[f"{name}/{cid}"] = float(usage.get("device_s", 0.0))
    return out


def _connect(devices: list[str]) -> dict:
    from .client import DeviceClient

    return {name: DeviceClient(name, client_id="physfarm-budget").connect() for name in devices}


@ray.remote(num_cpus=0, max_restarts=3)
class DeviceBudget:
    """spent (s) = spent_before + sum over devices and the sweep's clients of the device seconds they
    used since the sweep started: `baseline` is what the devices had counted for them then (a
    standing pool's earlier counts; given, so an actor restart keeps it)."""

    def __init__(self, budget_s: float, devices: list[str], prefixes: list[str], spent_before: float,
                 baseline: dict[str, float]):
        self.budget_s = float(budget_s)
        self.prefixes = tuple(prefixes)
        self.spent_before = float(spent_before)
        self._clients = _connect(devices)
        self._baseline = dict(baseline)

    def _used(self) -> dict[str, float]:
        return sweep_usage(self._clients, self.prefixes)

    def spent(self) -> float:
        now = self._used()
        # a count that went down (a device replica restarted without its log) is all new
        new = sum(v - self._baseline.get(k, 0.0) if v >= self._baseline.get(k, 0.0) else v for k, v in now.items())
        return self.spent_before + new

    def remaining(self) -> float:
        return self.budget_s - self.spent()

    def figures(self) -> dict:
        spent = self.spent()
        return {"budget_s": self.budget_s, "spent_s": spent, "remaining_s": self.budget_s - spent}


_HELD: dict = {}  # budget actor name -> its handle, held by the sweep's driver


def start_budget(sweep: str, budget_s: float, devices: list[str], prefixes: list[str],
                 spent_before: float = 0.0):
    """The sweep's budget actor (a fresh one: an earlier one of the same sweep is replaced)."""
    name = budget_actor_name(sweep)
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:  # none running
        pass
    baseline = sweep_usage(_connect(devices), tuple(prefixes))
    actor = DeviceBudget.options(name=name, namespace=NAMESPACE).remote(
        budget_s, devices, prefixes, spent_before, baseline)
    ray.get(actor.remaining.remote())  # it started and sees the devices
    _HELD[name] = actor  # an actor lives while its creator holds a handle: until stop_budget (or this driver ends)
    return actor


def stop_budget(sweep: str) -> None:
    _HELD.pop(budget_actor_name(sweep), None)
    try:
        ray.kill(ray.get_actor(budget_actor_name(sweep), namespace=NAMESPACE))
    except ValueError:
        pass


def budget_figures(sweep: str) -> dict | None:
    """{budget_s, spent_s, remaining_s} of a running sweep's budget, or None without one."""
    try:
        return ray.get(ray.get_actor(budget_actor_name(sweep), namespace=NAMESPACE).figures.remote())
    except ValueError:
        return None


class BudgetGate:
    """A trial's check before each device call (DeviceClient.forward)."""

    def __init__(self, sweep: str):
        self.sweep = sweep
        self._actor = None

    def check(self) -> None:
        if self._actor is None:
            self._actor = ray.get_actor(budget_actor_name(self.sweep), namespace=NAMESPACE)
        left = ray.get(self._actor.remaining.remote())
        if left <= 0:
            raise BudgetExhaustedError(f"sweep '{self.sweep}': its device budget (sweep.device_budget_s) is "
                                       f"spent ({-left:.3f} s over)")


class BudgetStopper(tune.Stopper):
    """Stops the whole Tune run once the budget is spent (asked at most every `every_s` seconds)."""

    def __init__(self, sweep: str, every_s: float = 0.5):
        self.sweep, self.every_s = sweep, every_s
        self._asked, self._spent = -1e9, False

    def __call__(self, trial_id, result) -> bool:
        return False  # a single trial is stopped by its gate; the run by stop_all

    def stop_all(self) -> bool:
        now = time.monotonic()
        if not self._spent and now - self._asked >= self.every_s:
            self._asked = now
            figures = budget_figures(self.sweep)
            self._spent = figures is not None and figures["remaining_s"] <= 0
        return self._spent


class BudgetCallback(tune.Callback):
    """Logs the budget on the parent run (and into the console's view) every `every_s` seconds and at
    the end of each Tune run, at step `sweep_step(started)`: `started` is the sweep's, shared by all
    its Tune runs (a multifidelity sweep's two, a resume's), so the last figure logged is the latest
    by step, which is the one MLflow shows."""

    def __init__(self, sweep: str, writer, parent_run: str, view=None, every_s: float = 5.0,
                 started: float | None = None):
        self.sweep, self.parent_run, self.view, self.every_s = sweep, parent_run, view, every_s
        self.journal_dir = str(writer.folder)
        self.uri = writer.uri
        self._writer = writer
        self.started = time.time() if started is None else float(started)
        self._logged = -1e9

    def __getstate__(self):  # Tune pickles callbacks: the writer is found again by its folder
        state = dict(self.__dict__)
        state.update(_writer=None, view=None)
        return state

    @property
    def writer(self):
        if self._writer is None:
            from .mlflow_ops import MlflowWriter

            self._writer = MlflowWriter.for_folder(self.uri, self.journal_dir)
        return self._writer

    def log(self, force: bool = False) -> dict | None:
        now = time.monotonic()
        if not force and now - self._logged < self.every_s:
            return None
        self._logged = now
        figures = budget_figures(self.sweep)
        if figures is None:
            return None
        log_budget(self.writer, self.parent_run, figures, sweep_step(self.started))
        if self.view is not None:
            self.view.budget = budget_line(figures)
        return figures

    def on_step_begin(self, iteration, trials, **info):
        self.log()

    def on_experiment_end(self, trials, **info):
        self.log(force=True)


def budget_line(figures: dict) -> str:
    left = max(0.0, figures["remaining_s"])
    return (f"device budget: {left:.1f} s left of {figures['budget_s']:.1f} s "
            f"({figures['spent_s']:.1f} s spent)")


def log_budget(writer, parent_run: str, figures: dict, step: int) -> None:
    ts = int(time.time() * 1000)
    writer.call("log_batch", run=parent_run, metrics=[
        ["device_budget_remaining_s", float(figures["remaining_s"]), ts, step],
        ["device_budget_spent_s", float(figures["spent_s"]), ts, step]])


__all__ = ["BudgetExhaustedError", "DeviceBudget", "BudgetGate", "BudgetStopper", "BudgetCallback", "start_budget",
           "stop_budget", "budget_figures", "budget_actor_name", "budget_line", "log_budget"]
