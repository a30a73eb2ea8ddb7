"""Errors a device raises. Callers distinguish refusals (never retried) from device faults (retried)."""


class DeviceError(RuntimeError):
    """The device (or its link) failed while serving a valid request; retrying may succeed."""


class EnvelopeError(ValueError):
    """A request was refused before reaching the device: wrong shape, non-finite or outside the envelope."""
