"""Waiting on a device actor's answer: Ray's own wrapper of a remote error taken off, so callers meet
the device's error (EnvelopeError, DeviceError, ValueError) as the device raised it."""
from __future__ import annotations

import ray
from ray.exceptions import RayTaskError

from actors.errors import DeviceError, EnvelopeError


def get(ref, timeout: float):
    """ray.get, raising the device's own error (EnvelopeError, DeviceError, ValueError) rather than
    Ray's wrapper of it."""
    try:
        return ray.get(ref, timeout=timeout)
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, (EnvelopeError, DeviceError, ValueError)):
            raise cause from None
        raise


def get_all(refs: list, timeout: float) -> list:
    """Wait for every ref (so that none is left unseen), then raise the first error, if any."""
    results, first = [], None
    for ref in refs:
        try:
            results.append(get(ref, timeout))
        except Exception as err:  # noqa: BLE001 - re-raised below
            results.append(None)
            first = first or err
    if first is not None:
        raise first
    return results
