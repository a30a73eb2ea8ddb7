"""`DeviceActor`: the Ray actor that owns one device and serves forward-pass requests.

This module is the shell: the Ray-facing methods and the device thread. What they drive lives in
pure objects of their own, each testable without Ray on a fake clock:
  - `actors/fair_queue.py`   the waiting requests, taken round-robin over clients (fairness);
  - `actors/leases.py`       the exclusive reservation of the device (leases);
  - `actors/device_stats.py` the accounting (calls, rows, busy time, per-client usage);
  - `actors/theta_rows.py`   the theta of a device call (shared, or expanded to rows once);
  - `actors/envelope.py`     the check of a request against the device's safe envelope;
  - `actors/errors.py`       every device error class.

Requests arrive as (x[B, n_inputs], theta[n_params], client). Each is checked against the envelope
once, on arrival, before it is queued, so a bad request never reaches the device nor poisons a merged
batch (the system is then called through `forward_checked` where it has one, so it does not check
again). One device thread owns the device (every `connect` and `forward` of the system runs on it, as
instrument drivers often require): it takes a batch from the fair queue, up to the device's max rows,
runs the device call, writes the call's audit lines and then answers each request's future itself;
then it takes the next batch at once (when that batch is ready at once, the answers go out just
before its call starts, so the threads they wake run while the device works).

A threaded Ray actor (sync methods; `farm.pool` starts it with `max_concurrency=RAY_THREADS`): each
`forward` runs on one of Ray's actor threads, queues its request (`submit`) and blocks on its future
until the device thread answers. An async actor did the same on an event loop, but Ray's async
path cost 0.6-0.7 ms more per call than a threaded one (issue 19, P4). The cheap methods (`stats`,
`load`, `ping`, `info`, the lease methods) take the lock only briefly, so they never wait behind a
device call, only for a free Ray thread: with more than RAY_THREADS requests waiting at once, further
calls (control ones included) wait in Ray's queue for the next answer. A caller that gives up
(`ray.cancel` after a client timeout) is noticed within `_CANCEL_POLL_S` (Ray only flags a threaded
task) and its request dropped from the queue unserved. In-process (tests, a local device) the same
object is used directly: `forward` blocks, `submit` returns a `concurrent.futures.Future`.

Backpressure: at most `max_queue_rows` rows wait; beyond that a request is refused at once with
`DeviceBusyError` (naming the device and the limit).

Leases (see `actors/leases.py`): while a lease is active, requests it does not admit are refused with
`DeviceLeasedError` (policy "refuse") or wait in the queue until the lease ends (policy "wait").

Constructing the actor does no I/O: no thread starts and the system is not connected until the first
request (or `connect()`).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass

import numpy as np
import torch

from .audit import AuditLog, audit_dir, audit_path, read as read_audit, replay
from .device_stats import DeviceStats
from .envelope import check_request
from .errors import DeviceBusyError, DeviceError, EnvelopeError, named_error
from .fair_queue import FairQueue
from .leases import LeaseTable
from .local_channel import ChannelServer
from .quotas import QuotaBook
from .reservations import ReservationBook
from .systems.registry import build_system
from .theta_rows import accepts_shared_theta, call_theta, splits_by_theta, theta_runs

__all__ = ["DeviceActor", "RAY_THREADS"]

# Ray threads of a device actor (its `max_concurrency`): requests waiting at once before further calls
# queue in Ray. Each thread costs little idle, but Ray spreads calls over all of them and more threads
# cost more per call (measured here, plain threaded actor, 256 x 64 request: 1 thread 2.16 ms,
# 64 threads 2.27 ms, 1000 threads 2.64 ms); 64 covers the 32-client load test with room.
RAY_THREADS = 64


@dataclass
class _Request:
    x: np.ndarray  # [rows, n_inputs] float32, checked
    theta: np.ndarray  # [n_params] float32, checked
    client: str
    future: Future  # answered by the device thread; cancelled when its caller gives up
    token: str | None
    enqueued: float  # the stats clock's time of arrival
    user: str = "unknown"  # the person the request is for
    quota_est: float = 0.0  # its estimated device seconds, held against its user's quota until served

    @property
    def rows(self) -> int:
        return self.x.shape[0]


def _given_up(req: _Request) -> bool:
    """A request whose caller stopped waiting (cancelled: ray.cancel after a client timeout)."""
    return req.future.done()


# How often (s) a Ray thread waiting on an answer checks whether its caller cancelled the call
# (`ray.cancel` after a client timeout): Ray cannot interrupt a threaded actor's task, it only flags it.
# The answer itself wakes the thread at once; this only bounds how long a given-up request stays queued.
_CANCEL_POLL_S = 0.25


def _caller_cancelled() -> bool:
    """Whether the Ray task this thread runs was cancelled (False outside a Ray actor)."""
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().is_canceled()
    except Exception:  # noqa: BLE001 - in-process (no task), or a Ray without the flag
        return False


def _wait(future: Future):
    """The future's result, on a thread that may block (a Ray actor thread, or in-process)."""
    while True:
        try:
            return future.result(timeout=_CANCEL_POLL_S)
        except TimeoutError:
            if _caller_cancelled():
                future.cancel()  # the fair queue drops it unserved
                raise CancelledError("the caller cancelled this request") from None


def _joined(parts: list[Future]) -> Future:
    """One future for the chunks of a request larger than the device's max rows: their rows in order,
    or the first error; cancelling it cancels the chunks still queued."""
    whole: Future = Future()
    left = [len(parts)]
    lock = threading.Lock()

    def one_done(_f: Future) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if whole.done():
            return
        failed = next((f for f in parts if f.done() and not f.cancelled() and f.exception() is not None), None)
        try:
            if failed is not None:
                whole.set_exception(failed.exception())
            elif last:
                whole.set_result(np.concatenate([f.result() for f in parts], axis=0))
        except (InvalidStateError, CancelledError):  # cancelled or settled meanwhile
            pass

    def whole_done(f: Future) -> None:
        if f.cancelled():
            for p in parts:
                p.cancel()

    for p in parts:
        p.add_done_callback(one_done)
    whole.add_done_callback(whole_done)
    return whole


class DeviceActor:
    """Serve one device. Use as `ray.remote(DeviceActor)`; see `farm.pool` for how it is started."""

    def __init__(self, system_config: dict, name: str = "device", max_wait_s: float = 0.0,
                 max_queue_rows: int = 1_000_000, lease_policy: str = "refuse",
                 max_lease_s: float = 7 * 86400.0, device: str | None = None, replica: int = 0,
                 replicas: int = 1, client_policy: dict | None = None, audit_dir_path: str | None = None,
                 quotas: dict | None = None, priorities: dict | None = None, local_channel: bool = True):
        # Construct only: no I/O here. The system connects on the first request (or `connect()`).
        self.name = name
        self.device = device or name.split("#")[0]
        self.replica = replica
        self.replicas = replicas
        # Shared by the Ray threads and the device thread: the queue, the leases and the stats are
        # only touched with this lock held (never held during a device call).
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        # A lease that ends wakes the device thread: requests it held back (policy "wait") may go.
        self._leases = LeaseTable(self.device, name, lease_policy, max_lease_s, on_end=self._cond.notify_all)
        self._system = build_system(system_config)
        self._spec = self._system.spec
        self._shared_theta = accepts_shared_theta(self._system)
        self._split_theta = splits_by_theta(self._system)
        # Requests are checked on arrival: call the system's unchecked entry where it has one.
        self._measure = getattr(self._system, "forward_checked", None) or self._system.forward
        self._max_wait_s = max_wait_s
        self._max_queue_rows = max_queue_rows
        self._client_policy = dict(client_policy or {})
        # Priority classes of users (None: one class): user -> class number, 0 served first.
        self._priority = dict(priorities["users"]) if priorities else None
        self._priority_default = int(priorities["default"]) if priorities else 0
        self._priority_classes = list(priorities.get("classes", [])) if priorities else []
        self._queue: FairQueue[_Request] = FairQueue(
            is_dead=_given_up, max_skips=int(priorities.get("max_skips", 4)) if priorities else 4)
        self._stats = DeviceStats()
        self._thread: threading.Thread | None = None
        self._control: deque = deque()  # (callable, future) to run on the device thread
        self._closing = False
        self._connected = False
        self._started_wall = time.time()
        self._restarted = _was_restarted()
        # Every call goes to this replica's audit file on this node (actors/audit.py); it is opened,
        # and a restart's accounting rebuilt from it, on the first request or stats (`_audit_begin`).
        self._audit = AuditLog(audit_path(audit_dir(audit_dir_path), self.device, replica))
        # Reservations and command-line leases are kept beside it, read back after a restart.
        self._book = ReservationBook(self.device, self._audit.path.with_name(f"{self.device}.{replica}.reservations.json"))
        self._leases.path = self._audit.path.with_name(f"{self.device}.{replica}.lease.json")
        # Device-seconds per user and period, charged from the audit log (None: no quotas).
        self._quota = QuotaBook(self.device, quotas) if quotas else None
        self._audit_begun = False
        self._restarts = 0  # this replica's restarts since it was started (from the audit log)
        # Forward requests of trainers on this node over a loopback socket (actors/local_channel.py),
        # started on the first `channel()`; False: every request goes through Ray.
        self._local_channel = local_channel
        self._channel: ChannelServer | None = None

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
            "restarted": self._restarted, "lease_policy": self._leases.policy,
            "max_queue_rows": self._max_queue_rows, "max_rows": self._spec.max_rows,
            "client_policy": dict(self._client_policy),
        }

    def channel(self) -> dict | None:
        """Where a client on this node may send forward requests beside Ray (actors/local_channel.py):
        {host, port, secret, node_id}; None when the device is configured without one. Started here,
        on first use; the secret is handed out only this way, over Ray."""
        if not self._local_channel:
            return None
        with self._lock:
            if self._channel is None:
                self._channel = ChannelServer(self.submit, self.name)
                self._channel.start()
        return {"host": self._channel.host, "port": self._channel.port, "secret": self._channel.secret,
                "node_id": _node_id()}

    def load(self) -> dict:
        """A cheap load figure for clients choosing a replica."""
        with self._lock:
            return {"queued_rows": self._queue.rows, "busy": self._stats.in_call,
                    "leased": self._leases.active() is not None}

    def stats(self) -> dict:
        with self._lock:
            self._audit_begin()
            now = self._stats.now()  # the stats clock: differences of two stats give exact windows
            return {
                "name": self.name,
                "device": self.device,
                "replica": self.replica,
                "system": self._spec.name,
                **self._stats.counters(now),
                "queued_rows": self._queue.rows,
                "queued_requests": len(self._queue),
                "max_queue_rows": self._max_queue_rows,
                "active_clients": self._stats.active_clients(now, also=self._queue.clients()),
                "lease": self._leases.info(),
                "clients": self._stats.clients(),
                "users": self._stats.users(now),
                "reservations": self._book.list(),
                "quota": self._quota.info() if self._quota is not None else None,
                "restarts": self._restarts,
                # the loopback channel, once a client asked for it: its port and open connections
                "local_channel": (None if self._channel is None else
                                  {"port": self._channel.port, "connections": self._channel.connections}),
                "life": {"pid": os.getpid(), "started": self._started_wall, "restarted": self._restarted},
                "audit": {"path": str(self._audit.path), "errors": self._audit.errors,
                          "last_error": self._audit.last_error},
            }

    def _audit_begin(self) -> None:
        """Once per actor life (lock held): after a restart, add the earlier lives' accounting from
        the audit log; then mark this start in it."""
        if self._audit_begun:
            return
        self._audit_begun = True
        self._book.load()
        self._leases.load()
        if self._quota is not None:
            self._quota.load(read_audit(self._audit.path))
        if self._restarted:
            old = replay(read_audit(self._audit.path))
            self._stats.restore(old.calls, old.rows, old.requests, old.errors, old.clients)
            self._restarts = old.restarts + 1
        self._audit.started(self._restarted)

    def audit(self, since: float | None = None, user: str | None = None) -> list[dict]:
        """This replica's audit records of requests (not its start events) from wall time `since`,
        of `user` only when given. Read on the calling Ray thread (the device thread never waits on it)."""
        return [dict(r, replica=self.replica) for r in read_audit(self._audit.path, since)
                if "event" not in r and (user is None or r.get("user") == user)]

    def reset_stats(self) -> None:
        with self._lock:
            self._stats.reset()

    def connect(self) -> None:
        """Connect the system now (on the device thread) instead of before its first call."""
        if not self._connected:
            _wait(self._on_device_thread(self._connect_system))

    def metadata(self) -> dict:
        """What the system reports of itself once connected (a recorded device: its fit's held-out
        errors and the data's notes); {} for a system that reports nothing."""
        self.connect()
        report = getattr(self._system, "metadata", None)
        return dict(report()) if callable(report) else {}

    def close(self) -> None:
        """Stop the device thread (after the call in progress) and close the system."""
        with self._cond:
            self._closing = True
            # Requests still queued are not served: fail them now rather than leave their callers'
            # threads waiting on an answer that will never come.
            for req in self._queue.remove_unless(lambda _r: False):
                self._unhold(req)
                self._settle(req.future, None, DeviceError(f"device '{self.device}' ({self.name}) is closing"))
            self._cond.notify_all()
        if self._channel is not None:
            self._channel.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._audit.close()
        try:
            self._system.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass

    def __ray_shutdown__(self) -> None:  # Ray calls this when the actor exits gracefully
        self.close()

    # -- leases ---------------------------------------------------------------------------------------
    def acquire_lease(self, holder: str, token: str, until: float, heartbeat_s: float = 10.0,
                      job: str | None = None) -> dict:
        """Reserve the device for `holder` until the wall time `until`, or renew (same token).

        The holder must call this again within every `heartbeat_s` seconds (a heartbeat), else the
        lease lapses. Calling it with the same token after an actor restart re-creates the lease.
        """
        with self._lock:
            lease, began = self._leases.acquire(holder, token, until, heartbeat_s, job)
            if began and self._leases.policy == "refuse":
                self._refuse_queued_outside_lease()
            return lease

    def release_lease(self, token: str) -> bool:
        """End the lease held with `token`. False if there was none; refused for another's token."""
        with self._lock:
            return self._leases.release(token)

    def lease_info(self) -> dict | None:
        with self._lock:
            return self._leases.info()

    # -- reservations -----------------------------------------------------------------------------------
    def reserve(self, user: str, start: float, end: float, by: str | None = None, note: str = "",
                rid: str | None = None) -> dict:
        """Book [start, end) (wall seconds) for `user`: only that user's requests are served then.
        ValueError for a bad window or an overlap (naming the reservation in the way)."""
        with self._cond:
            self._audit_begin()
            res = self._book.add(user, start, end, by=by, note=note, rid=rid)
            self._cond.notify_all()
            return res

    def unreserve(self, rid: str) -> dict:
        with self._cond:
            self._audit_begin()
            res = self._book.cancel(rid)
            self._cond.notify_all()  # requests held back by it may go
            return res

    def reservations(self) -> list[dict]:
        with self._lock:
            self._audit_begin()
            return self._book.list()

    def _refuse_queued_outside_lease(self) -> None:
        """A lease began under policy "refuse": the queued requests it does not admit fail now."""
        lease = self._leases.active()
        for req in self._queue.remove_unless(self._admitted):
            self._stats.refuse()
            self._unhold(req)
            self._settle(req.future, None, self._leases.refusal(lease, "queued request dropped"))

    def _unhold(self, req: _Request) -> None:
        """A queued request leaves unserved: its estimate no longer counts against its user's quota."""
        if self._quota is not None:
            self._quota.settle(req.user, req.quota_est, None)

    def _admitted(self, req: _Request) -> bool:
        return self._leases.admits(req.client, req.token, req.user) and self._book.admits(req.user)

    # -- serving ------------------------------------------------------------------------------------
    def forward(self, x, theta, client: str = "anonymous", lease_token: str | None = None,
                user: str | None = None) -> np.ndarray:
        """Measure y[B, n_outputs] for x[B, n_inputs] with one parameter vector theta[n_params].
        `client` names the run or trial the request serves, `user` the person it is for. Blocks the
        calling (Ray) thread until the device thread has answered."""
        return _wait(self.submit(x, theta, client, lease_token, user))

    def serve(self, x, theta, who: tuple) -> np.ndarray:
        """`forward` with who = (client, lease_token, user) in one argument: `DeviceClient`'s entry.
        Each argument of a Ray call is serialized on its own; one tuple instead of three small ones
        saves ~0.05-0.1 ms per call here (issue 19, P4)."""
        return _wait(self.submit(x, theta, *who))

    def submit(self, x, theta, client: str = "anonymous", lease_token: str | None = None,
               user: str | None = None) -> Future:
        """Check and queue a request; return the future of its y[B, n_outputs] (answered by the device
        thread). Refusals (envelope, backpressure, lease, reservation, quota) raise here, at once.
        In-process asyncio callers await `asyncio.wrap_future(actor.submit(...))`."""
        user = user or "unknown"
        if not self._audit_begun:
            with self._lock:
                self._audit_begin()
        try:
            x, theta = check_request(self._spec, x, theta, device=self.name, batched_theta=False)
        except EnvelopeError as err:
            with self._lock:
                self._stats.refuse()
                self._audit.refused(user, client, _rows_of(x), None, f"envelope: {str(err)[:200]}")
            raise
        rows = x.shape[0]
        with self._cond:
            try:
                est = self._refuse_if_needed(rows, client, lease_token, user)
            except DeviceError as err:
                self._audit.refused(user, client, rows, theta, f"{type(err).__name__}: {str(err)[:200]}")
                raise
            now = self._stats.arrive(client, user)
            # A request larger than the device's max rows is served as several chunks, in order.
            step = self._spec.max_rows
            chunks = [_Request(x[i : i + step], theta, client, Future(), lease_token, now, user,
                               est * min(step, rows - i) / rows if est else 0.0)
                      for i in range(0, rows, step)]
            if self._priority is None:
                self._queue.push(client, chunks)
            else:
                self._queue.push(client, chunks, self._priority.get(user, self._priority_default))
            self._ensure_thread()
            self._cond.notify_all()
        # If the caller gives up (ray.cancel after a client timeout), the future is cancelled; the
        # fair queue then drops the chunks unserved.
        if len(chunks) == 1:  # the common case: no joining wrapper
            return chunks[0].future
        return _joined([c.future for c in chunks])

    def _refuse_if_needed(self, rows: int, client: str, lease_token: str | None, user: str = "unknown") -> float:
        """Admission (lock held): backpressure, the lease, a reservation, then the user's quota.
        Returns the request's estimated device seconds held against the quota (0 without one)."""
        if rows > self._max_queue_rows:
            self._stats.refuse()
            raise DeviceBusyError(
                f"device '{self.device}' ({self.name}): a request of {rows} rows can never fit its "
                f"queue (max_queue_rows={self._max_queue_rows}); send at most "
                f"{self._max_queue_rows} rows per request or raise max_queue_rows in the device config"
            )
        if self._queue.rows + rows > self._max_queue_rows:
            self._stats.refuse()
            raise DeviceBusyError(
                f"device '{self.device}' ({self.name}): queue full ({self._queue.rows} rows waiting + "
                f"{rows} requested > max_queue_rows={self._max_queue_rows}); retry later, send fewer "
                f"concurrent requests, or add replicas"
            )
        lease = self._leases.active()
        if lease is not None and self._leases.refuses(client, lease_token, user):
            self._stats.refuse()
            raise self._leases.refusal(lease, "lease policy 'refuse'")
        if self._leases.policy == "refuse" and not self._book.admits(user):
            self._stats.refuse()
            raise self._book.refusal(self.name, user)
        if self._quota is None:
            return 0.0
        try:
            return self._quota.admit(user, rows)
        except DeviceError:
            self._stats.refuse()
            raise

    # -- the device thread ----------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        """Start the device thread (lock held). It answers each request's future itself."""
        if self._thread is None or not self._thread.is_alive():
            self._closing = False
            self._thread = threading.Thread(target=self._device_loop, name=f"device-{self.name}",
                                            daemon=True)
            self._thread.start()

    def _on_device_thread(self, fn) -> Future:
        """Run fn() on the device thread; the future of its result."""
        future: Future = Future()
        with self._cond:
            self._control.append((fn, future))
            self._ensure_thread()
            self._cond.notify_all()
        return future

    def _connect_system(self) -> None:
        if not self._connected:
            self._system.connect()
            self._connected = True

    @staticmethod
    def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
        """Answer a future from any thread (it wakes its waiter itself)."""
        if future.done():  # cancelled by its caller meanwhile
            return
        try:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        except InvalidStateError:  # cancelled between the check and the answer
            pass

    def _answer(self, batch: list[_Request], parts: list | None, error: BaseException | None) -> None:
        for i, r in enumerate(batch):
            self._settle(r.future, None if parts is None else parts[i], error)

    def _device_loop(self) -> None:
        # OpenMP's thread count is per thread: a new thread starts with the default (all cores), not
        # the process's torch.set_num_threads, and its parallel regions then fight the trainers for
        # the cores (seen: the oscillators' forward 40 % slower here than on the actor's main thread).
        torch.set_num_threads(torch.get_num_threads())
        # A finished call's answers (batch, parts, error), already in the audit file. When the next
        # call is ready at once they go out just before it starts: the threads they wake then run
        # (and take the GIL) while the device works, not while this thread prepares the next call
        # (answering first cost P1 ~0.03-0.04 of utilisation: gaps between back-to-back calls).
        pending = None
        while True:
            if pending is not None:
                with self._cond:
                    batch = self._ready_batch()
                if batch is None:
                    self._answer(*pending)
                    pending = None
                    continue
                pending = self._run(batch, before_call=lambda done=pending: self._answer(*done))
                continue
            with self._cond:
                work = self._next_work()
            if work is None:
                return
            if isinstance(work, tuple):  # a control call (e.g. connect)
                fn, future = work
                try:
                    self._settle(future, fn(), None)
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    self._settle(future, None, named_error(exc, self.name))
                continue
            pending = self._run(work)

    def _ready_batch(self) -> list[_Request] | None:
        """(lock held) The next batch if one can start now without waiting: no control call first,
        not closing, and (with max_wait_s) a full call's rows queued; else None."""
        if self._closing or self._control or not self._queue.ready(self._admitted):
            return None
        if self._max_wait_s > 0 and self._queue.rows < self._spec.max_rows:
            return None
        return self._queue.take(self._spec.max_rows, self._admitted) or None

    def _next_work(self):
        """Wait (lock held) for a control call or a batch of admitted requests; None when closing."""
        while True:
            if self._closing:
                return None
            if self._control:
                return self._control.popleft()
            if self._queue.ready(self._admitted):
                if self._max_wait_s > 0 and self._queue.rows < self._spec.max_rows:
                    # Let more rows join this call, up to max_wait_s or a full call.
                    deadline = time.monotonic() + self._max_wait_s
                    while self._queue.rows < self._spec.max_rows and not self._closing:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                batch = self._queue.take(self._spec.max_rows, self._admitted)
                if batch:
                    return batch
                continue
            if self._queue and self._leases.policy == "refuse" and self._book.current() is not None:
                # A reservation began while these waited: under "refuse" they fail now, not at its end.
                for req in self._queue.remove_unless(self._admitted):
                    self._stats.refuse()
                    self._unhold(req)
                    self._settle(req.future, None, self._book.refusal(self.name, req.user))
            ends = [t for t in (self._leases.remaining_s(), self._book.remaining_s()) if t is not None]
            # Requests held back by a lease or a reservation ("wait" policy) go when it ends: wake up then.
            timeout = max(0.01, min(ends) + 0.01) if (ends and self._queue) else None
            self._cond.wait(timeout)

    def _run(self, batch: list[_Request], before_call=None) -> tuple:
        """One device call for a batch (device thread, lock not held), written to the audit file;
        returns its answers (batch, parts, error) for `_answer`. `before_call()` runs once the call is
        prepared, just before it starts (the previous call's answers)."""
        try:
            sizes = [r.rows for r in batch]
            # concatenate also copies a lone request's rows: Ray hands the actor read-only buffers.
            x = torch.from_numpy(np.concatenate([r.x for r in batch], axis=0))
            thetas = [r.theta for r in batch]
            # One device call either way (one slot of device time, one audit line); a system that
            # says so is measured one theta at a time within it (actors/theta_rows.py).
            runs = theta_runs(thetas, sizes) if self._split_theta and len(batch) > 1 else None
            theta = call_theta(thetas, sizes, self._shared_theta) if runs is None or len(runs) == 1 else None
        finally:
            if before_call is not None:
                before_call()
        with self._lock:
            started = self._stats.call_starts((r.client, r.enqueued) for r in batch)
        t0 = time.time()
        try:
            self._connect_system()
            if theta is not None:
                y = _numpy(self._measure(x, theta))
            else:
                y = np.concatenate([_numpy(self._measure(x[a:b], t)) for a, b, t in runs], axis=0)
            if y.shape[0] != x.shape[0]:
                raise DeviceError(f"returned {y.shape[0]} rows for a call of {x.shape[0]}")
        except Exception as exc:  # a device fault fails this call's requests only
            error = named_error(exc, self.name)
            with self._lock:
                elapsed = self._stats.call_fails()
                if self._quota is not None:
                    for r in batch:
                        self._quota.settle(r.user, r.quota_est, None)
            self._audit_call(batch, t0, elapsed, started, f"error: {type(error).__name__}: {str(error)[:200]}")
            return batch, None, error
        parts, start = [], 0  # each request's rows (views of y); a Python sum: np.cumsum costs ~5 us
        for n in sizes:
            parts.append(y[start : start + n])
            start += n
        with self._lock:
            elapsed = self._stats.call_succeeds([(r.client, n) for r, n in zip(batch, sizes)])
            if self._quota is not None:
                total = sum(sizes)
                self._quota.observe(elapsed, total)
                for r in batch:
                    self._quota.settle(r.user, r.quota_est, elapsed * r.rows / total)
        # In the audit file before the answers go out: an answered request is always logged.
        self._audit_call(batch, t0, elapsed, started, "ok")
        return batch, parts, None

    def _audit_call(self, batch: list[_Request], t0: float, elapsed: float, started: float, outcome: str) -> None:
        total = sum(r.rows for r in batch) or 1
        self._audit.call(t0, elapsed, ((r.user, r.client, r.rows, r.theta, elapsed * r.rows / total,
                                        started - r.enqueued) for r in batch), outcome)


def _numpy(y) -> np.ndarray:
    """A system's answer (a torch tensor or array-like) as a numpy array."""
    return y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, np.float32)


def _rows_of(x) -> int:
    shape = getattr(x, "shape", None)
    return int(shape[0]) if shape else 0


def _node_id() -> str | None:
    """The Ray node this actor runs on (None outside Ray): a client compares it with its own."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001
        return None


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
