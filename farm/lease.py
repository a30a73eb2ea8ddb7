"""`Lease`: the client side of an exclusive reservation of a device (all its replicas).

Taken with `DeviceClient.lease(...)`. A daemon thread of the holder's process renews it (a heartbeat)
every `heartbeat_s / 3` seconds on every replica, so the lease lapses `heartbeat_s` after that
process dies; the device side is `actors/leases.py`. Owns its token, its heartbeat thread and its
state; reaches the replicas through `Replicas`' public methods.
"""
from __future__ import annotations

import threading
import time
import uuid

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.errors import DeviceError, DeviceLeasedError
from actors.leases import format_wall

from .replicas import Replicas
from .raycalls import get_all


class Lease:
    """An exclusive reservation of a device, renewed by a heartbeat thread until released or ended.

    Use as a context manager, or call `release()`. `lost` is set (with the reason) if a renewal was
    refused, e.g. because this process stalled longer than `heartbeat_s` and another holder took it.
    """

    def __init__(self, replicas: Replicas, holder: str, until: float, heartbeat_s: float,
                 control_timeout_s: float = 30.0):
        self.device = replicas.device
        self.holder, self.until, self.heartbeat_s = holder, until, heartbeat_s
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._replicas = replicas
        self._control_timeout_s = control_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self.lost is None and not self._stop.is_set() and time.time() < self.until

    @property
    def released(self) -> bool:
        return self._stop.is_set()

    def take(self, wait_s: float = 0.0) -> "Lease":
        """Acquire the lease on every replica, then keep it with the heartbeat thread. If another
        holder has the device, raise its `DeviceLeasedError` (naming it and its end), or with
        `wait_s > 0` keep trying for that long. Replicas taken before a refusal are given back."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._acquire_all()
                break
            except DeviceLeasedError:
                self._release_all()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.device}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop renewing and end the lease on every replica."""
        self._stop.set()
        self._release_all()

    def _acquire_all(self) -> None:
        job = ray.get_runtime_context().get_job_id()
        refs = [h.acquire_lease.remote(self.holder, self.token, self.until, self.heartbeat_s, job)
                for h in self._replicas.handles()]
        get_all(refs, self._control_timeout_s)  # every answer, then the first error

    def _release_all(self) -> None:
        refs = [h.release_lease.remote(self.token) for h in self._replicas.handles()]
        try:
            get_all(refs, self._control_timeout_s)
        except (DeviceError, RayActorError, GetTimeoutError):
            pass  # not ours there (another's lease), or the replica restarted without it

    def _beat(self) -> None:
        period = self.heartbeat_s / 3.0
        while not self._stop.wait(period):
            if time.time() >= self.until:
                break
            try:
                self._acquire_all()
            except DeviceLeasedError as err:
                self.lost = str(err)
                break
            except Exception:  # a restarting replica: the next beat re-creates the lease there
                continue

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease(device={self.device!r}, holder={self.holder!r}, until={format_wall(self.until)})"
