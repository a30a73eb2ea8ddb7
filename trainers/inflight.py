"""Sending a device call and collecting it later, so that a trainer computes while it is in flight.

The protocol (issue 19, P3): a device may offer `submit(x, theta)` returning a handle with `result()`
(y[B, n_outputs]) and `cancel()`; `farm.client.DeviceClient` does (a Ray call in flight), as does an
in-process `actors.device_actor.DeviceActor` (a `concurrent.futures.Future`). A device without it (a
simulator called in-process, a twin standing in for the device) is simply called at once:
`begin_forward` then returns its answer already done, so callers need not know which kind they have.
"""
from __future__ import annotations


class Done:
    """An answer computed eagerly (a device with no `submit`)."""

    def __init__(self, y):
        self._y = y

    def result(self):
        return self._y

    def cancel(self) -> None:
        pass


def begin_forward(device, x, theta):
    """Start device(x, theta); a handle whose `result()` is its y. x: [B, n_inputs], theta: [n_params]."""
    submit = getattr(device, "submit", None)
    if callable(submit):
        return submit(x, theta)
    return Done(device.forward(x, theta))
