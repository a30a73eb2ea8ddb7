"""`DeviceClient`: the trainer-side handle of a pooled device (the `Device` protocol over Ray).

- Replicas: a device `osc` may run as actors `osc#0..osc#R-1`; each request goes to the least-loaded
  replica (this client's rows in flight there plus the replica's queue as last seen, refreshed in
  the background at most every `load_refresh_s`; ties are broken at random so that many clients
  spread evenly).
- Faults: every call has a timeout (`timeout_s`, a `DeviceTimeoutError`, never retried since the
  device may still be working on it). Requests are idempotent measurements, so a request is retried
  up to `retries` times when it meets an actor restart (`RayActorError`, `ActorUnavailableError`:
  sent at once to another replica if there is one, else sent again when the restarted actor answers,
  waiting at most `restart_wait_s`), a full queue (`DeviceBusyError`) or a device fault
  (`DeviceError`; exponential backoff from `backoff_s`). Past that budget, or when the actor is gone
  for good (max_restarts spent), that one request fails with a `DeviceError` naming the device.
  `EnvelopeError` and `DeviceLeasedError` are never retried. `retries`, `backoff_s`, `timeout_s`
  and `restart_wait_s` default to the device config's `retries`, `retry_backoff_s`,
  `call_timeout_s` and `restart_wait_s` (advertised by the actor).
- Leases: `lease(seconds)` reserves every replica for this client (and clients named `holder/...`);
  a background thread renews it (heartbeat); the lease lapses when this process dies.
"""
from __future__ import annotations

import random
import threading
import time
import uuid

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.device_actor import DeviceBusyError, DeviceLeasedError, DeviceTimeoutError, format_wall
from actors.errors import DeviceError, EnvelopeError
from actors.spec import SystemSpec

from .pool import NAMESPACE, actor_name, running_devices

__all__ = ["DeviceClient", "Lease", "DeviceError", "DeviceBusyError", "DeviceLeasedError",
           "DeviceTimeoutError", "EnvelopeError"]

_DEFAULTS = {"retries": 3, "backoff_s": 0.2, "timeout_s": 300.0, "restart_wait_s": 120.0}
_NOT_RETRIED = (DeviceLeasedError, DeviceTimeoutError)
_EMPTY_USAGE = {"requests": 0, "rows": 0, "wait_s": 0.0, "device_s": 0.0}


class Lease:
    """An exclusive reservation of a device, renewed by a heartbeat thread until released or ended.

    Use as a context manager, or call `release()`. `lost` is set (with the reason) if a renewal was
    refused, e.g. because this process stalled longer than `heartbeat_s` and another holder took it.
    """

    def __init__(self, client: "DeviceClient", holder: str, until: float, heartbeat_s: float):
        self.client, self.holder, self.until, self.heartbeat_s = client, holder, until, heartbeat_s
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self.lost is None and not self._stop.is_set() and time.time() < self.until

    def _acquire_all(self) -> None:
        job = ray.get_runtime_context().get_job_id()
        refs = [h.acquire_lease.remote(self.holder, self.token, self.until, self.heartbeat_s, job)
                for h in self.client._handles]
        self.client._get_all(refs, self.client.control_timeout_s)  # every answer, then the first error

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

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.client.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self.client._lease is self:
            self.client._lease = None
        refs = [h.release_lease.remote(self.token) for h in self.client._handles]
        try:
            self.client._get_all(refs, self.client.control_timeout_s)
        except (DeviceError, RayActorError, GetTimeoutError):
            pass  # not ours there (another's lease), or the replica restarted without it

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease(device={self.client.name!r}, holder={self.holder!r}, until={format_wall(self.until)})"


class DeviceClient:
    """Calls a device's replicas by name. Construct, then `connect()` (the only I/O) once per trial."""

    def __init__(self, name: str, client_id: str = "anonymous", namespace: str = NAMESPACE,
                 timeout_s: float | None = None, retries: int | None = None,
                 backoff_s: float | None = None, control_timeout_s: float = 30.0,
                 load_refresh_s: float = 0.25, restart_wait_s: float | None = None):
        self.name = name
        self.client_id = client_id
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.restart_wait_s = restart_wait_s
        self.control_timeout_s = control_timeout_s
        self.load_refresh_s = load_refresh_s
        self._handles: list = []
        self._spec: SystemSpec | None = None
        self._lease: Lease | None = None
        self._lock = threading.Lock()
        self._inflight: list[int] = []
        self._load: list[float] = []
        self._load_refs: list | None = None
        self._load_at = 0.0
        self.retried = 0  # requests retried by this client (for tests and people)

    # -- connecting -----------------------------------------------------------------------------------
    def _lookup(self, replica: int):
        try:
            return ray.get_actor(actor_name(self.name, replica), namespace=self.namespace)
        except ValueError:
            return None

    def connect(self) -> "DeviceClient":
        replicas = running_devices(self.namespace).get(self.name, [])
        handles = [h for h in (self._lookup(i) for i in replicas) if h is not None]
        if not handles:
            raise DeviceError(
                f"device '{self.name}' is not running in namespace '{self.namespace}'; start it with "
                f"`physfarm devices up POOL.yaml` or let the sweep start it"
            )
        self._handles = handles
        self._inflight = [0] * len(handles)
        self._load = [0.0] * len(handles)
        info = self._call("info", idempotent=True, replica=0)
        policy = {**_DEFAULTS, **(info.get("client_policy") or {})}
        self.retries = policy["retries"] if self.retries is None else self.retries
        self.backoff_s = policy["backoff_s"] if self.backoff_s is None else self.backoff_s
        self.timeout_s = policy["timeout_s"] if self.timeout_s is None else self.timeout_s
        if self.restart_wait_s is None:
            self.restart_wait_s = policy["restart_wait_s"]
        self._spec = SystemSpec(**self._call("spec", replica=0))
        self._refresh_load(block=True)
        return self

    @property
    def replicas(self) -> int:
        return len(self._handles)

    @property
    def spec(self) -> SystemSpec:
        if self._spec is None:
            raise RuntimeError(f"DeviceClient('{self.name}') is not connected; call connect() first")
        return self._spec

    # -- choosing a replica ---------------------------------------------------------------------------
    def _refresh_load(self, block: bool = False) -> None:
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
                self._load[i] = load["queued_rows"] + (self.spec.max_rows if self._spec and load["busy"]
                                                       else 0)
            except Exception:
                self._load[i] = float("inf")  # unavailable: avoid until the next refresh
        self._load_refs = None
        self._load_at = time.monotonic()

    def _pick(self, avoid: set[int] = frozenset()) -> int:
        n = len(self._handles)
        if n == 1:
            return 0
        with self._lock:
            self._refresh_load()
            scores = [self._load[i] + self._inflight[i] + (float("inf") if i in avoid else 0.0)
                      for i in range(n)]
            best = min(scores)
            return random.choice([i for i in range(n) if scores[i] == best])

    # -- calling with timeouts and retries ------------------------------------------------------------
    def _get(self, ref, timeout: float):
        try:
            return ray.get(ref, timeout=timeout)
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, (EnvelopeError, DeviceError, ValueError)):
                raise cause from None
            raise

    def _get_all(self, refs: list, timeout: float) -> list:
        """Wait for every ref (so that none is left unseen), then raise the first error, if any."""
        results, first = [], None
        for ref in refs:
            try:
                results.append(self._get(ref, timeout))
            except Exception as err:  # noqa: BLE001 - re-raised below
                results.append(None)
                first = first or err
        if first is not None:
            raise first
        return results

    def _call(self, method: str, *args, idempotent: bool = True, replica: int | None = None,
              rows: int = 0, timeout: float | None = None):
        """Call `method` on a replica; retry idempotent calls on restarts and transient faults."""
        if not self._handles:
            raise RuntimeError(f"DeviceClient('{self.name}') is not connected; call connect() first")
        retries = (self.retries if self.retries is not None else _DEFAULTS["retries"]) if idempotent else 0
        backoff = self.backoff_s if self.backoff_s is not None else _DEFAULTS["backoff_s"]
        timeout = timeout or self.timeout_s or _DEFAULTS["timeout_s"]
        started = time.monotonic()
        attempt, failed = 0, set()  # replicas that lost their actor during this request
        while True:
            i = replica if replica is not None else self._pick(avoid=failed)
            handle = self._handles[i]
            with self._lock:
                self._inflight[i] += rows
            try:
                ref = getattr(handle, method).remote(*args)
                try:
                    return self._get(ref, timeout)
                except GetTimeoutError:
                    try:
                        ray.cancel(ref)  # the actor drops it if it is still queued
                    except Exception:  # noqa: BLE001 - best effort
                        pass
                    raise DeviceTimeoutError(
                        f"device '{self.name}' ({actor_name(self.name, i)}): no answer to {method} within "
                        f"{timeout:g} s; the device may be hung or overloaded (`physfarm devices ls`), "
                        f"or raise call_timeout_s in the device config") from None
            except (EnvelopeError, *_NOT_RETRIED):
                raise
            except (RayActorError, DeviceError) as err:
                if attempt >= retries:
                    raise self._give_up(err, method, i, attempt, time.monotonic() - started) from err
                if isinstance(err, RayActorError):
                    failed.add(i)
                    if replica is not None or len(failed) >= len(self._handles):
                        # No other replica to go to: wait for this one to be restarted.
                        if not self._await_restart(i, started):
                            raise self._give_up(err, method, i, attempt, time.monotonic() - started,
                                                dead=True) from err
                        failed.discard(i)
                else:
                    time.sleep(backoff * (2 ** attempt) * (0.5 + random.random()))
                self.retried += 1
                attempt += 1
            finally:
                with self._lock:
                    self._inflight[i] -= rows

    def _await_restart(self, i: int, started: float) -> bool:
        """Wait (up to `restart_wait_s` from `started`) until replica i answers again after losing its
        actor. False when its actor is gone for good (its name is no longer registered: max_restarts
        spent or stopped) or the wait ran out."""
        wait = self.restart_wait_s if self.restart_wait_s is not None else _DEFAULTS["restart_wait_s"]
        deadline = started + wait
        while time.monotonic() < deadline:
            fresh = self._lookup(i)
            if fresh is None:
                time.sleep(0.2)  # a dying actor keeps its name a moment; a restarting one keeps it
                if self._lookup(i) is None:
                    return False
                continue
            self._handles[i] = fresh
            try:
                ray.get(fresh.ping.remote(), timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                return True
            except (RayActorError, GetTimeoutError):
                time.sleep(0.1)
        return False

    def _give_up(self, err: Exception, method: str, replica: int, attempt: int, elapsed: float,
                 dead: bool = False) -> DeviceError:
        tries = f"after {attempt + 1} attempt{'s' if attempt else ''} over {elapsed:.2f} s (retries={attempt})"
        if isinstance(err, RayActorError):
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            why = ("its actor is gone (max_restarts spent, or stopped)" if dead else
                   "check `physfarm devices ls`")
            return DeviceError(
                f"device '{self.name}' ({actor_name(self.name, replica)}) is unavailable for {method} "
                f"{tries}: {type(err).__name__}: {first[:200]}; {why}")
        cls = type(err) if isinstance(err, DeviceError) else DeviceError
        return cls(f"{err} [{method} failed {tries}]")

    # -- the Device protocol ----------------------------------------------------------------------------
    def forward(self, x, theta) -> torch.Tensor:
        """y[B, n_outputs] for x[B, n_inputs] and theta[n_params] (float32)."""
        x = np.ascontiguousarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        theta = np.ascontiguousarray(
            theta.detach().numpy() if isinstance(theta, torch.Tensor) else theta, dtype=np.float32)
        token = self._lease.token if self._lease is not None and self._lease.active else None
        y = self._call("forward", x, theta, self.client_id, token, rows=int(x.shape[0]) if x.ndim else 0)
        return torch.from_numpy(np.array(y, dtype=np.float32))  # copy: Ray's buffers are read-only

    def ideal_model(self) -> torch.nn.Module:
        return self._call("ideal_model", replica=None)

    # -- accounting -------------------------------------------------------------------------------------
    def replica_stats(self) -> list[dict]:
        """`stats()` of every replica (each retried on a restart)."""
        return [self._call("stats", replica=i, timeout=self.control_timeout_s) for i in range(len(self._handles))]

    def stats(self) -> dict:
        """The device's stats summed over its replicas; per-replica figures under 'replicas'."""
        per = self.replica_stats()
        if len(per) == 1:
            return {**per[0], "replicas": per}
        out = {"name": self.name, "device": self.name, "system": per[0]["system"], "replicas": per}
        for key in ("calls", "rows", "requests", "errors", "refused", "busy_s", "queued_rows",
                    "queued_requests"):
            out[key] = sum(p[key] for p in per)
        out["utilisation"] = sum(p["utilisation"] for p in per) / len(per)
        out["utilisation_recent"] = sum(p["utilisation_recent"] for p in per) / len(per)
        out["active_clients"] = sorted({c for p in per for c in p["active_clients"]})
        out["lease"] = next((p["lease"] for p in per if p["lease"]), None)
        clients: dict[str, dict] = {}
        for p in per:
            for cid, usage in p["clients"].items():
                acc = clients.setdefault(cid, dict(_EMPTY_USAGE))
                for k in _EMPTY_USAGE:
                    acc[k] += usage[k]
        out["clients"] = clients
        return out

    def client_stats(self) -> dict:
        """This client's accounting at the device, summed over replicas: requests, rows, wait_s, device_s."""
        return dict(self.stats()["clients"].get(self.client_id, _EMPTY_USAGE))

    # -- leases -------------------------------------------------------------------------------------------
    def lease(self, seconds: float, holder: str | None = None, heartbeat_s: float = 10.0,
              wait_s: float = 0.0) -> Lease:
        """Reserve the device (all replicas) exclusively for `seconds`.

        Requests of this client, and of any client whose id is `holder` or starts with `holder/`,
        are served; others are refused or wait, as the device's `lease_policy` says. The lease is
        renewed every `heartbeat_s / 3` s by a daemon thread of this process and lapses `heartbeat_s`
        after this process dies. If another holder has the device, raise `DeviceLeasedError` (naming
        it and its end), or with `wait_s > 0` keep trying for that long.
        """
        if not seconds > 0:
            raise ValueError(f"lease seconds must be > 0, got {seconds!r}")
        if self._lease is not None and self._lease.active:
            raise DeviceLeasedError(f"this client already holds {self._lease!r}; release it first")
        holder = holder or self.client_id
        lease = Lease(self, holder, time.time() + seconds, heartbeat_s)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                lease._acquire_all()
                break
            except DeviceLeasedError:
                lease.release()  # the replicas already taken
                lease._stop.clear()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._lease = lease
        lease._start()
        return lease

    def lease_info(self) -> dict | None:
        """The lease active on the device (holder, until, ...), or None."""
        infos = [self._call("lease_info", replica=i, timeout=self.control_timeout_s)
                 for i in range(len(self._handles))]
        return next((i for i in infos if i), None)

    def release(self) -> None:
        """Release this client's lease (if any)."""
        if self._lease is not None:
            self._lease.release()
