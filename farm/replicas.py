"""`Replicas`: the running actors of one pooled device, and which one a request goes to.

A device `osc` may run as actors `osc#0..osc#R-1`. Each request goes to the least-loaded replica:
this client's rows in flight there plus the replica's queue as last seen (a busy replica counts a
full call more), refreshed in the background at most every `load_refresh_s`; ties are broken at
random so that many clients spread evenly. A replica that lost its actor is looked up again by name
when Ray restarts it (`await_restart`).

Owns its handles, in-flight rows and load figures; the retry policy and the lease use it through its
public methods only.
"""
from __future__ import annotations

import random
import threading
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.errors import DeviceError

from .pool import actor_name, running_devices


class Replicas:
    def __init__(self, device: str, namespace: str, load_refresh_s: float = 0.25,
                 control_timeout_s: float = 30.0, rng: random.Random | None = None):
        self.device = device
        self.namespace = namespace
        self.load_refresh_s = load_refresh_s
        self.control_timeout_s = control_timeout_s
        self._random = rng or random.Random()
        self._handles: list = []
        self._lock = threading.Lock()  # in-flight rows and load figures: several threads send at once
        self._inflight: list[int] = []
        self._load: list[float] = []
        self._load_refs: list | None = None  # a refresh in progress
        self._load_at = 0.0
        self._busy_rows = 0  # what a replica busy with a call counts, on top of its queue

    # -- finding them ---------------------------------------------------------------------------------
    def lookup(self, replica: int):
        """The handle of the actor now registered as that replica, or None."""
        try:
            return ray.get_actor(actor_name(self.device, replica), namespace=self.namespace)
        except ValueError:
            return None

    def connect(self) -> None:
        """Find the device's running replicas (the only I/O); DeviceError naming how to start it."""
        found = running_devices(self.namespace).get(self.device, [])
        handles = [h for h in (self.lookup(i) for i in found) if h is not None]
        if not handles:
            raise DeviceError(
                f"device '{self.device}' is not running in namespace '{self.namespace}'; start it with "
                f"`physfarm devices up POOL.yaml` or let the sweep start it"
            )
        with self._lock:
            self._handles = handles
            self._inflight = [0] * len(handles)
            self._load = [0.0] * len(handles)

    def __len__(self) -> int:
        return len(self._handles)

    def handle(self, replica: int):
        return self._handles[replica]

    def handles(self) -> list:
        """The current handles (a replica restarted by Ray has a fresh one)."""
        return list(self._handles)

    # -- choosing one ---------------------------------------------------------------------------------
    def watch_load(self, busy_rows: int) -> None:
        """Start choosing by load: a busy replica counts `busy_rows` (the device's max rows) on top of
        its queue. Waits for the first load figures."""
        self._busy_rows = busy_rows
        with self._lock:
            self._refresh_load(block=True)

    def pick(self, avoid: frozenset[int] | set[int] = frozenset()) -> int:
        """The replica for the next request: least load, not in `avoid` unless all are."""
        n = len(self._handles)
        if n == 1:
            return 0
        with self._lock:
            self._refresh_load()
            scores = [self._load[i] + self._inflight[i] + (float("inf") if i in avoid else 0.0)
                      for i in range(n)]
            best = min(scores)
            return self._random.choice([i for i in range(n) if scores[i] == best])

    def sending(self, replica: int, rows: int) -> None:
        """`rows` of this client are now in flight to `replica`."""
        with self._lock:
            self._inflight[replica] += rows

    def answered(self, replica: int, rows: int) -> None:
        """Those `rows` are no longer in flight (answered, failed or given up)."""
        with self._lock:
            self._inflight[replica] -= rows

    def _refresh_load(self, block: bool = False) -> None:
        """Lock held. Ask every replica for its load at most every load_refresh_s; read the answers
        when all have come (without waiting, unless `block`)."""
        if len(self._handles) < 2:
            return
        if self._load_refs is None:
            if not block and time.monotonic() - self._load_at < self.load_refresh_s:
                return
            self._load_refs = [h.load.remote() for h in self._handles]
        ready, _ = ray.wait(self._load_refs, num_returns=len(self._load_refs),
                            timeout=self.control_timeout_s if block else 0)
        if len(ready) < len(self._load_refs):
            return
        for i, ref in enumerate(self._load_refs):
            try:
                load = ray.get(ref)
                self._load[i] = load["queued_rows"] + (self._busy_rows if load["busy"] else 0)
            except Exception:
                self._load[i] = float("inf")  # unavailable: avoid until the next refresh
        self._load_refs = None
        self._load_at = time.monotonic()

    # -- after a lost actor -----------------------------------------------------------------------------
    def await_restart(self, replica: int, deadline: float) -> bool:
        """Wait (until the monotonic time `deadline`) for the replica to answer again after losing its
        actor. False when its actor is gone for good (its name is no longer registered: max_restarts
        spent or stopped) or the wait ran out."""
        while time.monotonic() < deadline:
            fresh = self.lookup(replica)
            if fresh is None:
                time.sleep(0.2)  # a dying actor keeps its name a moment; a restarting one keeps it
                if self.lookup(replica) is None:
                    return False
                continue
            self._handles[replica] = fresh
            try:
                ray.get(fresh.ping.remote(), timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                return True
            except (RayActorError, GetTimeoutError):
                time.sleep(0.1)
        return False
