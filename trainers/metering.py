"""Counts what a trainer asks of its device (calls, rows and seconds), whatever the device is."""
from __future__ import annotations

import time


class MeteredDevice:
    """Wraps a device and counts forward calls, rows and the seconds spent in them (wall time of the
    wrapped forward: a local simulator's own compute, or an actor's round trip); same protocol as
    the device it wraps."""

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

    def ideal_model(self):
        return self.inner.ideal_model()
