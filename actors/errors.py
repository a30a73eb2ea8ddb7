"""Errors a device raises. Callers distinguish refusals (never retried) from device faults (retried).

Every device error class lives here, so that the client side (`farm/`) and the actor side
(`actors/device_actor.py`) name the same classes without one importing the other.
"""


class DeviceError(RuntimeError):
    """The device (or its link) failed while serving a valid request; retrying may succeed."""


class EnvelopeError(ValueError):
    """A request was refused before reaching the device: wrong shape, non-finite or outside the envelope."""


class DeviceBusyError(DeviceError):
    """The device's queue is full (backpressure); retrying later may succeed."""


class DeviceLeasedError(DeviceError):
    """The device is reserved by another holder; not retried."""


class QuotaExceededError(DeviceError):
    """The request would take its user past a device-seconds quota; not retried (it would recur
    until the quota renews)."""


class DeviceTimeoutError(DeviceError):
    """A call got no answer in time (raised client-side); not retried."""


def named_error(exc: Exception, name: str) -> DeviceError:
    """`exc` as a DeviceError whose message names the device replica `name` (e.g. 'osc#0')."""
    prefix = f"device '{name}'"
    if isinstance(exc, DeviceError):
        if str(exc).startswith(prefix):
            return exc
        try:
            return type(exc)(f"{prefix}: {exc}")
        except Exception:  # a subclass with another constructor
            return DeviceError(f"{prefix}: {type(exc).__name__}: {exc}")
    return DeviceError(f"{prefix}: {type(exc).__name__}: {exc}")
