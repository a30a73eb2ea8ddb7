"""Counts what a trainer asks of its device (calls, rows and seconds), whatever the device is."""
from __future__ import annotations

import time

from .inflight import begin_forward


class MeteredDevice:
    """Wraps a device and counts forward calls, rows and the seconds spent in them (wall time of the
    wrapped forward: a local simulator's own compute, or an actor's round trip); same protocol as
    the device it wraps, `submit` included: a call sent with `submit` counts the seconds spent sending
    it and waiting for its answer, not the trainer's own work while it was in flight)."""

    def __init__(self, device):
        self.inner = device
        self.calls = 0
        self.rows = 0
        self.seconds = 0.0

    @property
    def spec(self):
        return self.inner.spec

    def forward(self, x, theta):
        self.calls += 1
        self.rows += int(x.shape[0])
        t0 = time.perf_counter()
        try:
            return self.inner.forward(x, theta)
        finally:
            self.seconds += time.perf_counter() - t0

    def submit(self, x, theta):
        self.calls += 1
        self.rows += int(x.shape[0])
        t0 = time.perf_counter()
        try:
            return _Metered(begin_forward(self.inner, x, theta), self)
        finally:
            self.seconds += time.perf_counter() - t0

    def ideal_model(self):
        return self.inner.ideal_model()


class _Metered:
    """A call in flight through a `MeteredDevice`: the wait in `result()` is counted too."""

    def __init__(self, pending, meter: MeteredDevice):
        self._pending, self._meter = pending, meter

    def result(self):
        t0 = time.perf_counter()
        try:
            return self._pending.result()
        finally:
            self._meter.seconds += time.perf_counter() - t0

    def cancel(self) -> None:
        self._pending.cancel()
