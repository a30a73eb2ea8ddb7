"""`DeviceClient`: the trainer-side handle of a pooled device (the `Device` protocol over Ray).

It composes three objects, each owning its own state:
- replica choice, `farm/replicas.py`: a device `osc` may run as actors `osc#0..osc#R-1`; each request
  goes to the least-loaded replica;
- retries and timeouts, `farm/retry.py`: every call has a timeout; idempotent calls are retried on
  actor restarts, full queues and device faults within the device's budget (`retries`, `backoff_s`,
  `timeout_s` and `restart_wait_s` default to the device config's `retries`, `retry_backoff_s`,
  `call_timeout_s` and `restart_wait_s`, advertised by the actor); `EnvelopeError` and
  `DeviceLeasedError` are never retried;
- local channels, `farm/local_channels.py`: forward requests to a replica on this process's node go
  over a loopback socket into the actor (~0.35 ms a call here) instead of a Ray call (~2.4 ms);
  everything else, and replicas on other nodes, go through Ray;
- leases, `farm/lease.py`: `lease(seconds)` reserves every replica for this client (and clients named
  `holder/...`); a background thread renews it (heartbeat); the lease lapses when this process dies.
Beside them, `merge_replica_stats` sums the replicas' accounting into the device's.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from actors.errors import DeviceBusyError, DeviceError, DeviceLeasedError, DeviceTimeoutError, EnvelopeError
from actors.spec import SystemSpec

from .lease import Lease
from .local_channels import LocalChannels
from .pool import NAMESPACE
from .replicas import Replicas
from .retry import Call, RetryPolicy
from .runinfo import current_user

__all__ = ["DeviceClient", "Lease", "DeviceError", "DeviceBusyError", "DeviceLeasedError",
           "DeviceTimeoutError", "EnvelopeError", "merge_replica_stats"]

_EMPTY_USAGE = {"requests": 0, "rows": 0, "wait_s": 0.0, "device_s": 0.0}
_SUMMED = ("calls", "rows", "requests", "errors", "refused", "busy_s", "queued_rows", "queued_requests")


class DeviceClient:
    """Calls a device's replicas by name. Construct, then `connect()` (the only I/O) once per trial."""

    def __init__(self, name: str, client_id: str = "anonymous", namespace: str = NAMESPACE,
                 timeout_s: float | None = None, retries: int | None = None,
                 backoff_s: float | None = None, control_timeout_s: float = 30.0,
                 load_refresh_s: float = 0.25, restart_wait_s: float | None = None, user: str | None = None,
                 budget=None, local_channel: bool = True):
        self.name = name
        self.budget = budget  # farm.budget.BudgetGate: asked before each forward call (a sweep's budget)
        self.client_id = client_id  # the run or trial the requests serve
        self.user = current_user(user)  # the person they are for: given, else $PHYSFARM_USER, else the login
        self.namespace = namespace
        self.control_timeout_s = control_timeout_s
        self._replicas = Replicas(name, namespace, load_refresh_s, control_timeout_s)
        self._retry = RetryPolicy(name, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s,
                                  restart_wait_s=restart_wait_s)
        # local_channel=False: every forward request through Ray (benches compare the two paths)
        self._channels = LocalChannels(self._replicas, control_timeout_s, enabled=local_channel)
        self._spec: SystemSpec | None = None
        self._lease: Lease | None = None

    # -- the policy in force (read-only views of the retry policy) -------------------------------------
    @property
    def retries(self) -> int | None:
        return self._retry.retries

    @property
    def backoff_s(self) -> float | None:
        return self._retry.backoff_s

    @property
    def timeout_s(self) -> float | None:
        return self._retry.timeout_s

    @property
    def restart_wait_s(self) -> float | None:
        return self._retry.restart_wait_s

    @property
    def load_refresh_s(self) -> float:
        return self._replicas.load_refresh_s

    @property
    def channel_requests(self) -> int:
        """Forward requests this client sent over a local channel rather than Ray."""
        return self._channels.sent

    @property
    def retried(self) -> int:
        """Requests retried by this client (for tests and people)."""
        return self._retry.retried

    # -- connecting -----------------------------------------------------------------------------------
    def connect(self) -> "DeviceClient":
        self._replicas.connect()
        info = self._call("info", replica=0)
        self._retry.adopt(info.get("client_policy") or {})
        self._spec = SystemSpec(**self._call("spec", replica=0))
        self._replicas.watch_load(self._spec.max_rows)
        return self

    @property
    def replicas(self) -> int:
        return len(self._replicas)

    @property
    def spec(self) -> SystemSpec:
        if self._spec is None:
            raise RuntimeError(f"DeviceClient('{self.name}') is not connected; call connect() first")
        return self._spec

    def _call(self, method: str, *args, replica: int | None = None, rows: int = 0,
              timeout: float | None = None):
        return self._retry.call(self._replicas, method, *args, replica=replica, rows=rows, timeout=timeout)

    # -- the Device protocol ----------------------------------------------------------------------------
    def forward(self, x, theta) -> torch.Tensor:
        """y[B, n_outputs] for x[B, n_inputs] and theta[n_params] (float32)."""
        return self.submit(x, theta).result()

    def submit(self, x, theta) -> "Measurement":
        """Send a forward request without waiting for it: `.result()` of the returned handle gives
        y[B, n_outputs] (a torch float32 tensor) as `forward` would, with the same retries, lease,
        user and client id; `.cancel()` gives it up. The trainers' overlap (`trainers.inflight`)."""
        # No copy when the caller's data is already contiguous float32 (a tensor's numpy() is a view).
        x = np.ascontiguousarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        theta = np.ascontiguousarray(
            theta.detach().numpy() if isinstance(theta, torch.Tensor) else theta, dtype=np.float32)
        if self.budget is not None:
            self.budget.check()  # raises BudgetExhaustedError once the sweep's device budget is spent
        token = self._lease.token if self._lease is not None and self._lease.active else None
        return Measurement(self._retry.send(self._replicas, "serve", x, theta, (self.client_id, token, self.user),
                                            rows=int(x.shape[0]) if x.ndim else 0, label="forward",
                                            channels=self._channels))

    def close(self) -> None:
        """Close this client's local-channel connections now (a trial's end) rather than when it is
        collected; a later request opens them again. A lease it holds is kept (see `release`)."""
        self._channels.close()

    def ideal_model(self) -> torch.nn.Module:
        return self._call("ideal_model")

    # -- accounting -------------------------------------------------------------------------------------
    def replica_stats(self) -> list[dict]:
        """`stats()` of every replica (each retried on a restart)."""
        return [self._call("stats", replica=i, timeout=self.control_timeout_s) for i in range(len(self._replicas))]

    def stats(self) -> dict:
        """The device's stats summed over its replicas; per-replica figures under 'replicas'."""
        return merge_replica_stats(self.name, self.replica_stats())

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
        lease = Lease(self._replicas, holder or self.client_id, time.time() + seconds, heartbeat_s,
                      self.control_timeout_s)
        self._lease = lease.take(wait_s)
        return lease

    def lease_info(self) -> dict | None:
        """The lease active on the device (holder, until, ...), or None."""
        infos = [self._call("lease_info", replica=i, timeout=self.control_timeout_s)
                 for i in range(len(self._replicas))]
        return next((i for i in infos if i), None)

    def release(self) -> None:
        """Release this client's lease (if any and not released already)."""
        if self._lease is not None and not self._lease.released:
            self._lease.release()


class Measurement:
    """A forward request in flight (`DeviceClient.submit`)."""

    def __init__(self, call: Call):
        self._call = call

    def result(self) -> torch.Tensor:
        y = self._call.result()
        # The one copy of the answer: Ray hands back read-only buffers, torch wants writable ones.
        return torch.from_numpy(np.array(y, dtype=np.float32))

    def cancel(self) -> None:
        self._call.cancel()


def merge_replica_stats(device: str, per: list[dict]) -> dict:
    """The stats of a device from those of its replicas (`DeviceActor.stats()` each): counters summed,
    utilisation averaged, clients' usage summed per client id; per-replica figures under 'replicas'."""
    if len(per) == 1:
        return {**per[0], "replicas": per}
    out = {"name": device, "device": device, "system": per[0]["system"], "replicas": per}
    for key in _SUMMED:
        out[key] = sum(p[key] for p in per)
    out["utilisation"] = sum(p["utilisation"] for p in per) / len(per)
    out["utilisation_recent"] = sum(p["utilisation_recent"] for p in per) / len(per)
    out["active_clients"] = sorted({c for p in per for c in p["active_clients"]})
    out["lease"] = next((p["lease"] for p in per if p["lease"]), None)
    out["restarts"] = sum(p.get("restarts", 0) for p in per)
    clients: dict[str, dict] = {}
    users: dict[str, dict] = {}
    for p in per:
        for cid, usage in p["clients"].items():
            acc = clients.setdefault(cid, {**_EMPTY_USAGE, "user": usage.get("user")})
            for k in _EMPTY_USAGE:
                acc[k] += usage[k]
        for name, usage in p.get("users", {}).items():
            acc = users.setdefault(name, {**_EMPTY_USAGE, "active": False})
            for k in _EMPTY_USAGE:
                acc[k] += usage[k]
            acc["active"] = acc["active"] or usage.get("active", False)
    out["clients"] = clients
    out["users"] = users
    return out
