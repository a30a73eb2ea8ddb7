"""What `physfarm sweep` shows while it runs: one line per trial (what varies, epoch, validation
accuracy, device seconds, status) and one per device (utilisation, queued rows, rows/s), redrawn in
place on a terminal (rich's Live) and printed as periodic plain lines otherwise (a log file, CI).

`SweepView` is the state, a small pure object fed by the Tune callback (`ConsoleCallback`), which
also polls the devices and logs their figures on the sweep's MLflow run over time
(`device.<name>.utilisation`, `.queued_rows`, `.rows_per_s`, step = seconds since the sweep began,
kept across its Tune runs and resumes).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from ray import tune

from .runinfo import ended_by
from .sweep_folder import sweep_step


@dataclass
class TrialLine:
    trial_id: str
    label: str  # what varies, e.g. "lr=0.03 seed=1"
    epoch: int = 0
    epochs: int | None = None
    val_accuracy: float | None = None
    device_s: float | None = None
    status: str = "PENDING"
    retries: int = 0  # the trial's device requests retried (restarts, full queues, device faults)
    val_on_twin: bool = False  # val_accuracy is the twin's (an in-silico screen before its device pass)

    def cells(self) -> tuple[str, str, str]:
        """(epoch "3/6", val accuracy, device seconds) as shown, "-" where not known yet."""
        val = "-" if self.val_accuracy is None or self.val_accuracy != self.val_accuracy else (
            f"{self.val_accuracy:.4f}" + (" twin" if self.val_on_twin else ""))
        return (f"{self.epoch}/{self.epochs}" if self.epochs else str(self.epoch), val,
                f"{self.device_s:.1f}" if self.device_s is not None else "-")


@dataclass
class DeviceLine:
    name: str
    utilisation: float = 0.0
    queued_rows: int = 0
    rows_per_s: float = 0.0
    restarts: int = 0  # restarts of the device's actor (all replicas) since it was started
    _rows: int | None = None
    _at: float | None = None
    _lives: dict | None = None  # replica -> (pid, start time) of its actor life last seen

    def update(self, stats: dict, now: float) -> list[str]:
        """Take a device's stats; returns what to tell the user (a restart seen), else []."""
        told = []
        lives = {r.get("replica", 0): (r.get("life") or {}).get("started")
                 for r in stats.get("replicas", [stats])}
        restarts = int(stats.get("restarts", 0))
        if self._lives is not None:
            changed = sorted(k for k, v in lives.items() if k in self._lives and v != self._lives[k])
            if changed or restarts > self.restarts:
                which = ", ".join(f"{self.name}#{k}" for k in changed) or self.name
                told.append(f"device '{self.name}': its actor {which} restarted ({max(restarts, self.restarts + 1)} "
                            f"restart{'s' if max(restarts, self.restarts + 1) != 1 else ''} so far); the trials' "
                            f"requests in flight are retried, its accounting goes on from its audit log")
                restarts = max(restarts, self.restarts + 1)
        self._lives = lives
        self.restarts = max(self.restarts, restarts)
        rows = int(stats.get("rows", 0))
        if self._rows is not None and self._at is not None and now > self._at and rows >= self._rows:
            self.rows_per_s = (rows - self._rows) / (now - self._at)
        self._rows, self._at = rows, now
        self.utilisation = float(stats.get("utilisation_recent", 0.0))
        self.queued_rows = int(stats.get("queued_rows", 0))
        return told


@dataclass
class SweepView:
    """The sweep's state as shown: trials by id (in order of appearance) and devices by name."""

    title: str
    trials: dict[str, TrialLine] = field(default_factory=dict)
    devices: dict[str, DeviceLine] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what happened, e.g. a device restart, in order
    budget: str | None = None  # the sweep's device budget, e.g. "device budget: 12.0 s left of 60.0 s (...)"

    def trial(self, trial_id: str, label: str) -> TrialLine:
        return self.trials.setdefault(trial_id, TrialLine(trial_id, label))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials.values():
            out[t.status] = out.get(t.status, 0) + 1
        return out

    def retries(self) -> int:
        """Device requests retried by the trials so far."""
        return sum(t.retries for t in self.trials.values())

    def lines(self) -> list[str]:
        """The view as plain text lines (one per trial, one per device)."""
        done = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.counts().items()))
        retried = self.retries()
        out = [f"{self.title}: {done or 'starting'}" + (f"; {retried} device requests retried" if retried else "")]
        if self.budget:
            out.append(f"  {self.budget}")
        for t in self.trials.values():
            epoch, val, dev = t.cells()
            out.append(f"  {t.trial_id}  {t.label:<28} epoch {epoch:>7}  val {val}  device_s {dev:>7}  {t.status}")
        for d in self.devices.values():
            out.append(f"  device {d.name}: utilisation {d.utilisation:.0%}, queued rows {d.queued_rows}, "
                       f"{d.rows_per_s:.0f} rows/s" + (f", restarted {d.restarts}x" if d.restarts else ""))
        return out

    def table(self):
        """The view as a rich renderable (for a terminal)."""
        from rich.console import Group
        from rich.table import Table

        trials = Table(title=self.title, title_justify="left", expand=False)
        for name, justify in (("trial", "left"), ("what varies", "left"), ("epoch", "right"),
                              ("val_accuracy", "right"), ("device_s", "right"), ("status", "left")):
            trials.add_column(name, justify=justify)
        for t in self.trials.values():
            trials.add_row(t.trial_id, t.label, *t.cells(), t.status)
        devices = Table(expand=False, caption=f"{self.retries()} device requests retried" if self.retries() else None)
        for name in ("device", "utilisation", "queued rows", "rows/s", "restarts"):
            devices.add_column(name, justify="left" if name == "device" else "right")
        for d in self.devices.values():
            devices.add_row(d.name, f"{d.utilisation:.0%}", str(d.queued_rows), f"{d.rows_per_s:.0f}", str(d.restarts))
        return Group(trials, devices, *([self.budget] if self.budget else []), *self.notes[-5:])


class ConsoleCallback(tune.Callback):
    """Feeds a SweepView from Tune's events, polls the devices, draws the view, and logs the devices'
    figures on the sweep's MLflow run (through the sweep's writer, when it is given one)."""

    def __init__(self, view: SweepView, devices: list[str], describe, writer=None,
                 parent_run: str | None = None, stream=None, live: bool | None = None,
                 poll_s: float = 2.0, print_every_s: float = 30.0, log_every_s: float = 10.0,
                 started: float | None = None):
        self.view = view
        self.device_names = list(devices)
        self.describe = describe  # trial -> ("lr=0.03 seed=1", its epochs): picklable (Tune pickles callbacks)
        self.writer, self.parent_run = writer, parent_run
        self.stream = stream or sys.stdout
        self.live_wanted = self.stream.isatty() if live is None else live
        self.poll_s, self.print_every_s, self.log_every_s = poll_s, print_every_s, log_every_s
        self._live = None
        # the devices' metric steps: seconds (wall clock) since the sweep began, one clock for all of a
        # sweep's Tune runs (a multifidelity sweep's two, a resume's), so later figures have later steps
        self.started = time.time() if started is None else float(started)
        self._polled = self._printed = self._logged = -1e9
        self._pending: dict = {}
        self._last_text = ""
        for name in self.device_names:
            self.view.devices.setdefault(name, DeviceLine(name))

    def __getstate__(self):  # Tune pickles callbacks with its experiment state: keep only plain settings
        state = dict(self.__dict__)
        state.update(_live=None, writer=None, stream=None, _pending={})
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.stream = sys.stdout

    # -- Tune's events -------------------------------------------------------------------------------
    def _line(self, trial) -> TrialLine:
        """The trial's line; a trial met for the first time is described (its config resolved) once."""
        line = self.view.trials.get(trial.trial_id)
        if line is None:
            label, epochs = self.describe(trial)
            line = self.view.trial(trial.trial_id, label)
            line.epochs = epochs
        return line

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trial).status = "RUNNING"
        self._draw()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        line = self._line(trial)
        line.status = "RUNNING"
        line.epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        line.val_accuracy = result.get("val_accuracy", line.val_accuracy)
        line.val_on_twin = False
        twin = result.get("val_accuracy_twin")
        if (line.val_accuracy is None or line.val_accuracy != line.val_accuracy) and isinstance(twin, (int, float)):
            # in silico, the device measures validation once, after the last epoch: until then the twin's
            line.val_accuracy, line.val_on_twin = float(twin), True
        line.device_s = result.get("device_s_total", line.device_s)
        line.retries = int(result.get("device_retries", line.retries) or 0)
        self._draw()

    def on_trial_complete(self, iteration, trials, trial, **info):
        # a trial that met a recurring error ends (not retried) with it as its last result
        self._line(trial).status = "ERROR" if ended_by(getattr(trial, "last_result", None)) else "DONE"
        self._draw(force=not self.live_wanted)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial).status = "ERROR"
        self._draw(force=not self.live_wanted)

    def on_step_begin(self, iteration, trials, **info):
        self._poll()
        self._draw()

    def on_experiment_end(self, trials, **info):
        self._poll(wait_s=5.0)  # the devices' last figures, and a restart not seen yet, before the end
        self.close()

    # -- devices ---------------------------------------------------------------------------------------
    def _poll(self, wait_s: float = 0.0) -> None:
        """Ask each device for its figures without waiting: answers are read on a later step (or,
        with `wait_s`, now: ask and wait that long for the answers)."""
        now = time.monotonic()
        if now - self._polled < self.poll_s and not wait_s:
            return
        import ray

        from .pool import find_device, running_devices

        if not ray.is_initialized():  # no Ray (a test feeding events): nothing to ask, and no Ray to start
            return
        if wait_s:
            for name in self.device_names:
                if name not in self._pending:
                    handles = [h for h in (find_device(name, i) for i in running_devices().get(name, [])) if h]
                    if handles:
                        self._pending[name] = [h.stats.remote() for h in handles]
            refs = [r for refs in self._pending.values() for r in refs]
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=wait_s)
        ready = [n for n, refs in self._pending.items()
                 if len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)]
        for name in ready:
            try:
                per = [ray.get(ref) for ref in self._pending.pop(name)]
            except Exception:  # noqa: BLE001 - a restarting device answers on a later poll
                self._pending.pop(name, None)
                continue
            stats = {**per[0], "replicas": per, "rows": sum(p.get("rows", 0) for p in per),
                     "restarts": sum(p.get("restarts", 0) for p in per),
                     "utilisation_recent": sum(p.get("utilisation_recent", 0.0) for p in per) / len(per),
                     "queued_rows": sum(p.get("queued_rows", 0) for p in per)}
            for note in self.view.devices[name].update(stats, now):
                self._tell(note)
        for name in self.device_names:
            if name not in self._pending:
                handles = [h for h in (find_device(name, i) for i in running_devices().get(name, [])) if h]
                if handles:
                    self._pending[name] = [h.stats.remote() for h in handles]
        self._polled = now
        self._log_devices(now)

    def _log_devices(self, now: float) -> None:
        """The devices' figures on the sweep's run, every log_every_s (monotonic `now`)."""
        if self.writer is not None and self.parent_run and now - self._logged >= self.log_every_s:
            self._logged = now
            step, ts = sweep_step(self.started), int(time.time() * 1000)
            rows = []
            for d in self.view.devices.values():
                rows += [[f"device.{d.name}.utilisation", d.utilisation, ts, step],
                         [f"device.{d.name}.queued_rows", float(d.queued_rows), ts, step],
                         [f"device.{d.name}.rows_per_s", d.rows_per_s, ts, step]]
            if rows:
                self.writer.call("log_batch", run=self.parent_run, metrics=rows)

    def _tell(self, note: str) -> None:
        """Say at once what happened (a plain line, or under the live view's tables)."""
        stamped = f"{time.strftime('%H:%M:%S')} {note}"
        self.view.notes.append(stamped)
        if self.stream is not None and not self.live_wanted:
            print(stamped, file=self.stream, flush=True)

    # -- drawing ---------------------------------------------------------------------------------------
    def _draw(self, force: bool = False) -> None:
        if self.stream is None:
            return
        if self.live_wanted:
            if self._live is None:
                from rich.console import Console
                from rich.live import Live

                self._live = Live(self.view.table(), console=Console(file=self.stream), refresh_per_second=2,
                                  transient=False)
                self._live.start()
            else:
                self._live.update(self.view.table())
            return
        now = time.monotonic()
        if force or now - self._printed >= self.print_every_s:
            self._printed = now
            self._print()

    def _print(self) -> None:
        """Plain lines, unless they would repeat the block printed last (the end of a sweep)."""
        text = "\n".join(self.view.lines())
        if text != self._last_text:
            self._last_text = text
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self.view.table())
            self._live.stop()
            self._live = None
        elif self.stream is not None:
            self._print()
