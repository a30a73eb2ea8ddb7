"""Counts what a trainer asks of its device (calls and rows), whatever the device is."""
from __future__ import annotations


class MeteredDevice:
    """Wraps a device and counts forward calls and rows; same protocol as the device it wraps."""

    def __init__(self, device):
        self.inner = device
        self.calls = 0
        self.rows = 0

    @property
    def spec(self):
        return self.inner.spec

    def forward(self, x, theta):
        self.calls += 1
        self.rows += int(x.shape[0])
        return self.inner.forward(x, theta)

    def ideal_model(self):
        return self.inner.ideal_model()
