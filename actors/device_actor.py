"""`DeviceActor`: the Ray actor that owns one device and serves forward-pass requests.

Requests arrive as (x[B, n_inputs], theta[n_params], client). Each is checked against the envelope
before it is queued, so a bad request never reaches the device nor poisons a merged batch. One device
thread owns the device (every `connect` and `forward` of the system runs on it, as instrument drivers
often require): it takes queued requests round-robin over clients, least recently served first (so
a client sending huge batches cannot starve the others), until the device's max rows, runs the
device call and hands the rows back per request, in order, to the actor's event loop; then it takes
the next batch at once. The event loop only queues and answers, so `stats`, `load`, `ping`, `info`
and the lease methods never wait behind a device call. A device call gets theta[rows, n_params]
(one row per sample), or theta[n_params] when all its requests share one vector and the system
accepts a shared theta (`accepts_shared_theta` below).

Backpressure: at most `max_queue_rows` rows wait; beyond that a request is refused at once with
`DeviceBusyError` (naming the device and the limit).

Leases: a holder may reserve the device exclusively (`acquire_lease`). While a lease is active the
device serves only requests that carry the lease token or come from a client id equal to the holder
or under it (`holder/...`, e.g. the trials of a sweep named `holder`). Other requests are refused
with `DeviceLeasedError` (policy "refuse") or wait in the queue until the lease ends (policy
"wait"). A lease ends at its `until` time, on `release_lease`, or when its holder stops sending
heartbeats for `heartbeat_s` seconds: the holder's process (driver, trial or actor) renews it from a
background thread, so when that process dies, the lease lapses on its own. A lease is bound to a
secret token: another client cannot renew, take over or release it.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .envelope import check_request
from .errors import DeviceError, EnvelopeError
from .systems.registry import build_system

RECENT_WINDOW_S = 60.0  # utilisation and active clients are reported over this window


class DeviceBusyError(DeviceError):
    """The device's queue is full (backpressure); retrying later may succeed."""


class DeviceLeasedError(DeviceError):
    """The device is reserved by another holder; not retried."""


class DeviceTimeoutError(DeviceError):
    """A call got no answer in time (raised client-side); not retried."""


def format_wall(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@dataclass
class _Request:
    x: np.ndarray  # [rows, n_inputs] float32
    theta: np.ndarray  # [n_params] float32
    client: str
    future: asyncio.Future
    token: str | None = None
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class _ClientStats:
    requests: int = 0
    rows: int = 0
    wait_s: float = 0.0  # time requests spent queued before their device call started
    device_s: float = 0.0  # this client's share (by rows) of the busy time of the calls it was in
    last_seen: float = 0.0  # actor monotonic time of the client's last request


@dataclass
class _Lease:
    holder: str
    token: str
    until: float  # wall clock (time.time): the lease's end
    heartbeat_s: float  # lapses when no heartbeat came for this long
    last_beat: float  # actor monotonic time of the last heartbeat
    job: str | None = None  # the holder's Ray job id, for people reading `devices ls`
    since: float = field(default_factory=time.time)

    def remaining_s(self) -> float:
        return min(self.until - time.time(), self.last_beat + self.heartbeat_s - time.monotonic())

    def public(self) -> dict:
        return {"holder": self.holder, "until": self.until, "until_text": format_wall(self.until),
                "since": self.since, "heartbeat_s": self.heartbeat_s, "job": self.job,
                "remaining_s": max(0.0, self.remaining_s())}


class DeviceActor:
    """Serve one device. Use as `ray.remote(DeviceActor)`; see `farm.pool` for how it is started."""

    def __init__(self, system_config: dict, name: str = "device", max_wait_s: float = 0.0,
                 max_queue_rows: int = 1_000_000, lease_policy: str = "refuse",
                 max_lease_s: float = 7 * 86400.0, device: str | None = None, replica: int = 0,
                 replicas: int = 1, client_policy: dict | None = None):
        # Construct only: no I/O here. The system connects on the first request (or `connect()`).
        if lease_policy not in ("refuse", "wait"):
            raise ValueError(f"lease_policy must be 'refuse' or 'wait', got {lease_policy!r}")
        self.name = name
        self.device = device or name.split("#")[0]
        self.replica = replica
        self.replicas = replicas
        self._system = build_system(system_config)
        self._spec = self._system.spec
        self._shared_theta = accepts_shared_theta(self._system)
        self._max_wait_s = max_wait_s
        self._max_queue_rows = max_queue_rows
        self._lease_policy = lease_policy
        self._max_lease_s = max_lease_s
        self._client_policy = dict(client_policy or {})
        self._queues: "OrderedDict[str, deque[_Request]]" = OrderedDict()
        self._last_served: dict[str, int] = {}  # client -> turn (device call) it was last served in
        self._turn = 0
        self._queued_rows = 0
        # Shared by the event loop and the device thread: every field above and below that either
        # writes is guarded by this lock (never held during a device call).
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control: deque = deque()  # (callable, future) to run on the device thread
        self._closing = False
        self._connected = False
        self._lease: _Lease | None = None
        self._started = time.monotonic()
        self._started_wall = time.time()
        self._restarted = _was_restarted()
        self._call_started: float | None = None  # monotonic start of the device call in progress
        self._spans: deque[tuple[float, float]] = deque()  # (start, end) of recent device calls
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._calls = 0
        self._rows = 0
        self._requests = 0
        self._errors = 0
        self._refused = 0
        self._busy_s = 0.0
        self._first_request: float | None = None
        self._clients: dict[str, _ClientStats] = {}

    # -- cheap methods: never queue behind device calls --------------------------------------------
    def ping(self) -> str:
        return "pong"

    def spec(self) -> dict:
        return self._spec.model_dump()

    def ideal_model(self) -> torch.nn.Module:
        """The nominal-physics model of this device (a differentiable twin to start from)."""
        return self._system.ideal_model()

    def info(self) -> dict:
        """Where and what this replica is (for `devices ls` and clients)."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "name": self.name, "device": self.device, "replica": self.replica, "replicas": self.replicas,
            "system": self._spec.name, "node_id": ctx.get_node_id(), "node_ip": _node_ip(),
            "hostname": socket.gethostname(), "pid": os.getpid(), "started": self._started_wall,
            "restarted": self._restarted, "lease_policy": self._lease_policy,
            "max_queue_rows": self._max_queue_rows, "max_rows": self._spec.max_rows,
            "client_policy": dict(self._client_policy),
        }

    def load(self) -> dict:
        """A cheap load figure for clients choosing a replica."""
        with self._lock:
            return {"queued_rows": self._queued_rows, "busy": self._call_started is not None,
                    "leased": self._active_lease() is not None}

    def _busy_now(self, now: float) -> float:
        return self._busy_s + ((now - self._call_started) if self._call_started is not None else 0.0)

    def _recent_busy(self, now: float) -> float:
        lo = now - RECENT_WINDOW_S
        busy = sum(min(e, now) - max(s, lo) for s, e in self._spans if e > lo)
        if self._call_started is not None:
            busy += now - max(self._call_started, lo)
        return busy

    def stats(self) -> dict:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict:
        now = time.monotonic()
        span = (now - self._first_request) if self._first_request is not None else 0.0
        busy = self._busy_now(now)
        window = min(RECENT_WINDOW_S, now - self._started)
        lease = self._active_lease()
        active = sorted(c for c, s in self._clients.items() if now - s.last_seen <= RECENT_WINDOW_S)
        active = sorted(set(active) | set(self._queues))
        return {
            "name": self.name,
            "device": self.device,
            "replica": self.replica,
            "system": self._spec.name,
            "now": now,  # actor monotonic clock: differences of two stats give exact windows
            "calls": self._calls,
            "rows": self._rows,
            "requests": self._requests,
            "errors": self._errors,
            "refused": self._refused,
            "busy_s": busy,
            "span_s": span,
            "utilisation": min(1.0, busy / span) if span > 0 else 0.0,
            "utilisation_recent": min(1.0, self._recent_busy(now) / window) if window > 0 else 0.0,
            "in_call": self._call_started is not None,
            "queued_rows": self._queued_rows,
            "queued_requests": sum(len(q) for q in self._queues.values()),
            "max_queue_rows": self._max_queue_rows,
            "active_clients": active,
            "lease": lease.public() if lease else None,
            "clients": {k: {"requests": v.requests, "rows": v.rows, "wait_s": v.wait_s,
                            "device_s": v.device_s} for k, v in self._clients.items()},
        }

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_counters()
            self._spans.clear()
            if self._call_started is not None:  # of the call in progress, only what follows counts
                self._busy_s = -(time.monotonic() - self._call_started)

    async def connect(self) -> None:
        """Connect the system now (on the device thread) instead of before its first call."""
        if not self._connected:
            await self._on_device_thread(self._connect_system)

    def close(self) -> None:
        """Stop the device thread (after the call in progress) and close the system."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        try:
            self._system.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass

    def __ray_shutdown__(self) -> None:  # Ray calls this when the actor exits gracefully
        self.close()

    # -- leases ---------------------------------------------------------------------------------------
    def _active_lease(self) -> _Lease | None:
        """The lease in force (an ended one is dropped here). Call with the lock held."""
        lease = self._lease
        if lease is not None and lease.remaining_s() <= 0:
            self._lease = None
            lease = None
            self._cond.notify_all()  # requests waiting for the lease to end may go now
        return lease

    def _admits(self, client: str, token: str | None) -> bool:
        lease = self._active_lease()
        if lease is None:
            return True
        return token == lease.token or client == lease.holder or client.startswith(lease.holder + "/")

    def _leased_error(self, lease: _Lease, what: str) -> DeviceLeasedError:
        return DeviceLeasedError(
            f"device '{self.device}' ({self.name}) is reserved by '{lease.holder}' until "
            f"{format_wall(lease.until)} ({what}); wait until then, use another device, or ask "
            f"'{lease.holder}' to release it (a lease cannot be taken over)"
        )

    def acquire_lease(self, holder: str, token: str, until: float, heartbeat_s: float = 10.0,
                      job: str | None = None) -> dict:
        """Reserve the device for `holder` until the wall time `until`, or renew (same token).

        The holder must call this again within every `heartbeat_s` seconds (a heartbeat), else the
        lease lapses. Calling it with the same token after an actor restart re-creates the lease.
        """
        if not isinstance(holder, str) or not holder.strip():
            raise ValueError(f"lease holder must be a non-empty name, got {holder!r}")
        if not isinstance(token, str) or len(token) < 8:
            raise ValueError("lease token must be a string of at least 8 characters (use uuid4().hex)")
        now = time.time()
        if not until > now:
            raise ValueError(f"lease end {format_wall(until)} is not in the future; give seconds > 0")
        if until - now > self._max_lease_s + 1.0:
            raise ValueError(f"lease of {until - now:.0f} s on device '{self.device}' exceeds the "
                             f"device's max_lease_s={self._max_lease_s:.0f}; ask for less")
        if not 0 < heartbeat_s <= 3600:
            raise ValueError(f"heartbeat_s must be in (0, 3600], got {heartbeat_s!r}")
        with self._lock:
            return self._acquire_lease(holder, token, until, heartbeat_s, job)

    def _acquire_lease(self, holder, token, until, heartbeat_s, job) -> dict:
        lease = self._active_lease()
        if lease is not None and lease.token != token:
            raise self._leased_error(lease, "lease requested by '" + holder + "' refused")
        if lease is None:
            lease = self._lease = _Lease(holder, token, until, heartbeat_s, time.monotonic(), job)
            if self._lease_policy == "refuse":
                self._fail_queued_non_admitted(lease)
        else:
            lease.until, lease.heartbeat_s, lease.last_beat = until, heartbeat_s, time.monotonic()
        return lease.public()

    def release_lease(self, token: str) -> bool:
        """End the lease held with `token`. False if there was none; refused for another's token."""
        with self._lock:
            lease = self._active_lease()
            if lease is None:
                return False
            if lease.token != token:
                raise self._leased_error(lease, "only its holder can release it")
            self._lease = None
            self._cond.notify_all()
            return True

    def lease_info(self) -> dict | None:
        with self._lock:
            lease = self._active_lease()
            return lease.public() if lease else None

    def _fail_queued_non_admitted(self, lease: _Lease) -> None:
        for client in list(self._queues):
            queue = self._queues[client]
            kept = deque()
            for req in queue:
                if req.future.done():
                    self._queued_rows -= req.x.shape[0]
                elif self._admits(req.client, req.token):
                    kept.append(req)
                else:
                    self._queued_rows -= req.x.shape[0]
                    self._refused += 1
                    self._post(self._settle, req.future, None, self._leased_error(lease, "queued request dropped"))
            if kept:
                self._queues[client] = kept
            else:
                del self._queues[client]

    # -- serving ------------------------------------------------------------------------------------
    async def forward(self, x, theta, client: str = "anonymous", lease_token: str | None = None) -> np.ndarray:
        """Measure y[B, n_outputs] for x[B, n_inputs] with one parameter vector theta[n_params]."""
        try:
            x, theta = check_request(self._spec, x, theta, device=self.name, batched_theta=False)
        except EnvelopeError:
            with self._lock:
                self._refused += 1
            raise
        rows = x.shape[0]
        loop = asyncio.get_running_loop()
        with self._cond:
            self._refuse_if_needed(rows, client, lease_token)
            now = time.monotonic()
            if self._first_request is None:
                self._first_request = now
            self._clients.setdefault(client, _ClientStats()).last_seen = now
            # A request larger than the device's max rows is served as several chunks, in order.
            step = self._spec.max_rows
            chunks = [_Request(x[i : i + step], theta, client, loop.create_future(), lease_token, now)
                      for i in range(0, rows, step)]
            self._queues.setdefault(client, deque()).extend(chunks)
            self._queued_rows += rows
            self._ensure_thread(loop)
            self._cond.notify_all()
        # If the caller cancels (ray.cancel after a client timeout), the awaited future (one chunk)
        # or gather (several) is cancelled with it; the device thread then drops them from the queue.
        if len(chunks) == 1:  # the common case: no gather wrapper (a per-request cost, ~tens of us)
            return await chunks[0].future
        parts = await asyncio.gather(*(c.future for c in chunks))
        return np.concatenate(parts, axis=0)

    def _refuse_if_needed(self, rows: int, client: str, lease_token: str | None) -> None:
        if rows > self._max_queue_rows:
            self._refused += 1
            raise DeviceBusyError(
                f"device '{self.device}' ({self.name}): a request of {rows} rows can never fit its "
                f"queue (max_queue_rows={self._max_queue_rows}); send at most "
                f"{self._max_queue_rows} rows per request or raise max_queue_rows in the device config"
            )
        if self._queued_rows + rows > self._max_queue_rows:
            self._refused += 1
            raise DeviceBusyError(
                f"device '{self.device}' ({self.name}): queue full ({self._queued_rows} rows waiting + "
                f"{rows} requested > max_queue_rows={self._max_queue_rows}); retry later, send fewer "
                f"concurrent requests, or add replicas"
            )
        lease = self._active_lease()
        if lease is not None and self._lease_policy == "refuse" and not self._admits(client, lease_token):
            self._refused += 1
            raise self._leased_error(lease, "lease policy 'refuse'")

    # -- the device thread ----------------------------------------------------------------------------
    def _ensure_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the device thread (lock held). It answers on `loop`, the actor's event loop."""
        if self._thread is None or not self._thread.is_alive():
            self._loop = loop
            self._closing = False
            self._thread = threading.Thread(target=self._device_loop, name=f"device-{self.name}",
                                            daemon=True)
            self._thread.start()

    async def _on_device_thread(self, fn):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            self._control.append((fn, future))
            self._ensure_thread(loop)
            self._cond.notify_all()
        return await future

    def _connect_system(self) -> None:
        if not self._connected:
            self._system.connect()
            self._connected = True

    def _post(self, fn, *args) -> None:
        """Run fn(*args) on the event loop (futures belong to it)."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    @staticmethod
    def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
        if future.done():  # cancelled by its caller meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _answer(self, batch: list[_Request], parts: list | None, error: BaseException | None) -> None:
        for i, r in enumerate(batch):
            self._settle(r.future, None if parts is None else parts[i], error)

    def _device_loop(self) -> None:
        # OpenMP's thread count is per thread: a new thread starts with the default (all cores), not
        # the process's torch.set_num_threads, and its parallel regions then fight the trainers for
        # the cores (seen: the oscillators' forward 40 % slower here than on the actor's main thread).
        torch.set_num_threads(torch.get_num_threads())
        while True:
            with self._cond:
                work = self._next_work()
            if work is None:
                return
            if isinstance(work, tuple):  # a control call (e.g. connect)
                fn, future = work
                try:
                    self._post(self._settle, future, fn(), None)
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    self._post(self._settle, future, None, _named_error(exc, self.name))
                continue
            self._run(work)

    def _next_work(self):
        """Wait (lock held) for a control call or a batch of admitted requests; None when closing."""
        while True:
            if self._closing:
                return None
            if self._control:
                return self._control.popleft()
            if self._has_admitted_work():
                if self._max_wait_s > 0 and self._queued_rows < self._spec.max_rows:
                    # Let more rows join this call, up to max_wait_s or a full call.
                    deadline = time.monotonic() + self._max_wait_s
                    while self._queued_rows < self._spec.max_rows and not self._closing:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                batch = self._take_batch()
                if batch:
                    return batch
                continue
            lease = self._active_lease()
            # Requests held back by a lease ("wait" policy) go when it lapses: wake up then.
            timeout = max(0.01, lease.remaining_s() + 0.01) if (lease and self._queues) else None
            self._cond.wait(timeout)

    def _head(self, client: str) -> _Request | None:
        """The first live request of a client's queue (cancelled ones are dropped). Lock held."""
        queue = self._queues[client]
        while queue and queue[0].future.done():
            self._queued_rows -= queue.popleft().x.shape[0]
        if not queue:
            del self._queues[client]
            return None
        return queue[0]

    def _has_admitted_work(self) -> bool:
        for client in list(self._queues):
            req = self._head(client)
            if req is not None and self._admits(req.client, req.token):
                return True
        return False

    def _take_batch(self) -> list[_Request]:
        """Round-robin over clients, least recently served first, one request each per turn, until
        the next would exceed max rows. A client with a long queue of big requests thus gets one
        request per call while every other waiting client also gets one: it cannot starve them.
        Lock held."""
        batch: list[_Request] = []
        rows = 0
        limit = self._spec.max_rows
        order = sorted(self._queues, key=lambda c: self._last_served.get(c, -1))
        while order:
            progressed = False
            for client in order:
                if client not in self._queues:
                    continue
                req = self._head(client)
                if req is None or not self._admits(req.client, req.token):
                    continue
                if batch and rows + req.x.shape[0] > limit:
                    continue
                queue = self._queues[client]
                queue.popleft()
                batch.append(req)
                rows += req.x.shape[0]
                progressed = True
                if not queue:
                    del self._queues[client]
                if rows >= limit:
                    break
            if rows >= limit or not progressed:
                break
        if batch:
            self._turn += 1
            for req in batch:
                self._last_served[req.client] = self._turn
            if len(self._last_served) > 100_000:  # forget long-gone clients
                self._last_served = {c: t for c, t in self._last_served.items() if c in self._queues}
        self._queued_rows -= rows
        return batch

    def _run(self, batch: list[_Request]) -> None:
        """One device call for a batch (device thread, lock not held), then answer each request."""
        sizes = [r.x.shape[0] for r in batch]
        # concatenate also copies a lone request's rows: Ray hands the actor read-only buffers.
        x = torch.from_numpy(np.concatenate([r.x for r in batch], axis=0))
        theta = self._call_theta(batch, sizes)
        with self._lock:
            start = self._call_started = time.monotonic()
            for r in batch:
                self._clients.setdefault(r.client, _ClientStats()).wait_s += start - r.enqueued
        try:
            self._connect_system()
            y = self._system.forward(x, theta)
            y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, np.float32)
            if y.shape[0] != x.shape[0]:
                raise DeviceError(f"returned {y.shape[0]} rows for a call of {x.shape[0]}")
        except Exception as exc:  # a device fault fails this call's requests only
            with self._lock:
                self._end_call()
                self._errors += 1
            self._post(self._answer, batch, None, _named_error(exc, self.name))
            return
        offsets = np.cumsum([0, *sizes])
        parts = [y[offsets[i] : offsets[i + 1]] for i in range(len(batch))]
        total = int(offsets[-1])
        with self._lock:
            elapsed = self._end_call()
            self._calls += 1
            self._rows += total
            self._requests += len(batch)
            for r, n in zip(batch, sizes):
                stats = self._clients.setdefault(r.client, _ClientStats())
                stats.requests += 1
                stats.rows += n
                stats.device_s += elapsed * n / total
        self._post(self._answer, batch, parts, None)

    def _call_theta(self, batch: list[_Request], sizes: list[int]) -> torch.Tensor:
        """theta of one device call: theta[n_params] when every request of the batch carries the same
        vector and the system takes a shared theta (one client's requests, the common case: no
        [rows, n_params] copy, e.g. 256 x 4160 floats = 4 MB for oscillators, and the system can use
        it once per call), else one row per sample, theta[rows, n_params] (the documented contract)."""
        first = batch[0].theta
        if self._shared_theta and all(r.theta is first or np.array_equal(r.theta, first) for r in batch[1:]):
            return torch.from_numpy(first.copy())  # a copy: the system may keep or modify its input
        return torch.from_numpy(
            np.concatenate([np.broadcast_to(r.theta, (n, r.theta.shape[0])) for r, n in zip(batch, sizes)])
        )

    def _end_call(self) -> float:
        end = time.monotonic()
        start = self._call_started if self._call_started is not None else end
        self._call_started = None
        elapsed = end - start
        self._busy_s += elapsed
        self._spans.append((start, end))
        lo = end - RECENT_WINDOW_S
        while self._spans and self._spans[0][1] < lo:
            self._spans.popleft()
        return elapsed


def accepts_shared_theta(system) -> bool:
    """Whether `system.forward` may be called with one theta[n_params] for all rows (broadcast by the
    system) instead of theta[rows, n_params]. A system says so with a class attribute
    `accepts_shared_theta = True`; the simulators (`SimulatedSystem`, whose forward broadcasts a 1-D
    theta) do by default. Any other system (user systems, instruments) gets the documented
    theta[rows, n_params]."""
    flag = getattr(system, "accepts_shared_theta", None)
    if flag is not None:
        return bool(flag)
    from .systems.base import SimulatedSystem

    return isinstance(system, SimulatedSystem)


def _named_error(exc: Exception, name: str) -> DeviceError:
    """The device's error as a DeviceError whose message names the device replica."""
    prefix = f"device '{name}'"
    if isinstance(exc, DeviceError):
        if str(exc).startswith(prefix):
            return exc
        try:
            return type(exc)(f"{prefix}: {exc}")
        except Exception:  # a subclass with another constructor
            return DeviceError(f"{prefix}: {type(exc).__name__}: {exc}")
    return DeviceError(f"{prefix}: {type(exc).__name__}: {exc}")


def _was_restarted() -> bool:
    try:
        import ray

        if not ray.is_initialized():
            return False
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside a Ray actor (e.g. constructed in-process by a test)
        return False


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else "local"
    except Exception:
        return "?"
