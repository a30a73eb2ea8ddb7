"""`RetryPolicy`: how a call to a pooled device is timed out and retried.

Every call has a timeout (`timeout_s`; past it a `DeviceTimeoutError`, never retried since the device
may still be working on it). Requests are idempotent measurements, so a call is retried up to
`retries` times when it meets an actor restart (`RayActorError`, `ActorUnavailableError`: sent at
once to another replica if there is one, else sent again when the restarted actor answers, waiting
at most `restart_wait_s`), a full queue (`DeviceBusyError`) or a device fault (`DeviceError`;
exponential backoff from `backoff_s`). Past that budget, or when the actor is gone for good
(max_restarts spent), that one call fails with a `DeviceError` naming the device. `EnvelopeError`
`DeviceLeasedError` and `QuotaExceededError` are never retried. Settings left unset take the device's advertised client
policy (`adopt`), else `DEFAULTS`.

Owns its settings and the count of retries; reaches the replicas through `Replicas`' public methods.
`send` starts a call without waiting (a `Call`: the first attempt is in flight, `result()` waits and
retries), so a trainer can compute while its device call travels (issue 19, P3); `call` is
`send(...).result()`. Given `channels` (farm/local_channels.py), a forward request (`serve`) goes
over the replica's local channel where it has one; a lost channel counts as a lost actor.
"""
from __future__ import annotations

import random
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.errors import DeviceError, DeviceLeasedError, DeviceTimeoutError, EnvelopeError, QuotaExceededError

from .pool import actor_name
from .local_channels import ChannelLost, LocalChannels
from .raycalls import get
from .replicas import Replicas

DEFAULTS = {"retries": 3, "backoff_s": 0.2, "timeout_s": 300.0, "restart_wait_s": 120.0}
NOT_RETRIED = (EnvelopeError, DeviceLeasedError, DeviceTimeoutError, QuotaExceededError)


class RetryPolicy:
    def __init__(self, device: str, retries: int | None = None, backoff_s: float | None = None,
                 timeout_s: float | None = None, restart_wait_s: float | None = None):
        self.device = device
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.restart_wait_s = restart_wait_s
        self.retried = 0  # calls retried under this policy (for tests and people)

    def adopt(self, advertised: dict) -> None:
        """Fill the settings the caller left unset from the device's advertised client policy."""
        policy = {**DEFAULTS, **(advertised or {})}
        for key in DEFAULTS:
            if getattr(self, key) is None:
                setattr(self, key, policy[key])

    def _setting(self, key: str):
        value = getattr(self, key)
        return DEFAULTS[key] if value is None else value

    def call(self, replicas: Replicas, method: str, *args, idempotent: bool = True,
             replica: int | None = None, rows: int = 0, timeout: float | None = None):
        """Call `method` on a replica (`replica`, or the one `replicas` picks); retry idempotent calls
        on restarts and transient faults. `rows` counts as in flight there meanwhile."""
        return self.send(replicas, method, *args, idempotent=idempotent, replica=replica, rows=rows,
                         timeout=timeout).result()

    def send(self, replicas: Replicas, method: str, *args, idempotent: bool = True,
             replica: int | None = None, rows: int = 0, timeout: float | None = None,
             label: str | None = None, channels: LocalChannels | None = None) -> "Call":
        """Send the first attempt of a call now, without waiting: `result()` of the returned `Call`
        waits for it and does the retries, exactly as `call` does. `label` names the call in errors
        (default: the method)."""
        if not len(replicas):
            raise RuntimeError(f"DeviceClient('{self.device}') is not connected; call connect() first")
        return Call(self, replicas, method, args, self._setting("retries") if idempotent else 0,
                    replica, rows, timeout or self.timeout_s or DEFAULTS["timeout_s"], label or method,
                    channels if method == "serve" else None)

    def _give_up(self, err: Exception, method: str, replica: int, attempt: int, elapsed: float,
                 dead: bool = False) -> DeviceError:
        tries = f"after {attempt + 1} attempt{'s' if attempt else ''} over {elapsed:.2f} s (retries={attempt})"
        if isinstance(err, (RayActorError, ChannelLost)):
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            why = ("its actor is gone (max_restarts spent, or stopped)" if dead else
                   "check `physfarm devices ls`")
            return DeviceError(
                f"device '{self.device}' ({actor_name(self.device, replica)}) is unavailable for {method} "
                f"{tries}: {type(err).__name__}: {first[:200]}; {why}")
        cls = type(err) if isinstance(err, DeviceError) else DeviceError
        return cls(f"{err} [{method} failed {tries}]")


class Call:
    """One call to a device, its first attempt sent on construction (so the caller can compute while
    it is in flight); `result()` waits for it, retrying as its policy says. Call `result()` (or
    `cancel()`) exactly once: until then its rows count as in flight at the replica."""

    def __init__(self, policy: RetryPolicy, replicas: Replicas, method: str, args: tuple, retries: int,
                 replica: int | None, rows: int, timeout: float, label: str,
                 channels: LocalChannels | None = None):
        self._policy, self._replicas, self._method, self._args = policy, replicas, method, args
        self._channels = channels  # forward requests: the replica's local channel where it has one
        self._label = label
        self._retries, self._replica, self._rows, self._timeout = retries, replica, rows, timeout
        self._started = time.monotonic()
        self._attempt = 0
        self._failed: set[int] = set()  # replicas that lost their actor during this call
        self._open = False  # an attempt is in flight (its rows counted at replica self._i)
        self._send()

    def _send(self) -> None:
        self._i = self._replica if self._replica is not None else self._replicas.pick(avoid=self._failed)
        self._replicas.sending(self._i, self._rows)
        self._open = True
        self._ref, self._error, self._direct = None, None, None
        try:
            if self._channels is not None:
                self._direct = self._channels.send(self._i, *self._args)  # None: no channel, use Ray
            if self._direct is None:
                self._ref = getattr(self._replicas.handle(self._i), self._method).remote(*self._args)
        except Exception as err:  # noqa: BLE001 - met (and retried) in result(), as a failed answer
            self._error = err

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._replicas.answered(self._i, self._rows)

    def cancel(self) -> None:
        """Give up on the call (its answer is not wanted): the actor drops it if still queued."""
        if self._direct is not None:
            self._direct.cancel()
        if self._ref is not None:
            try:
                ray.cancel(self._ref)
            except Exception:  # noqa: BLE001 - best effort
                pass
        self._close()

    def result(self):
        """The answer (waiting for it); retries on restarts and transient faults, as `call`."""
        try:
            while True:
                try:
                    return self._answer()
                except NOT_RETRIED:
                    raise
                except (RayActorError, ChannelLost, DeviceError) as err:
                    self._before_retry(err)  # raises when the budget is spent or the actor is gone
                    self._close()
                    self._send()
        finally:
            self._close()

    def _answer(self):
        if self._error is not None:
            raise self._error
        try:
            if self._direct is not None:
                return self._direct.result(self._timeout)
            return get(self._ref, self._timeout)
        except (GetTimeoutError, TimeoutError):
            if self._ref is not None:
                try:
                    ray.cancel(self._ref)  # the actor drops it if it is still queued
                except Exception:  # noqa: BLE001 - best effort
                    pass
            device = self._policy.device
            raise DeviceTimeoutError(
                f"device '{device}' ({actor_name(device, self._i)}): no answer to {self._label} within "
                f"{self._timeout:g} s; the device may be hung or overloaded (`physfarm devices ls`), or "
                f"raise call_timeout_s in the device config") from None

    def _before_retry(self, err: Exception) -> None:
        """After a failed attempt: raise if no retry is left, else wait as the policy says."""
        policy, i = self._policy, self._i
        if self._attempt >= self._retries:
            raise policy._give_up(err, self._label, i, self._attempt, time.monotonic() - self._started) from err
        if isinstance(err, (RayActorError, ChannelLost)):
            self._failed.add(i)
            if self._replica is not None or len(self._failed) >= len(self._replicas):
                # No other replica to go to: wait for this one to be restarted.
                deadline = self._started + policy._setting("restart_wait_s")
                if not self._replicas.await_restart(i, deadline):
                    raise policy._give_up(err, self._label, i, self._attempt,
                                          time.monotonic() - self._started, dead=True) from err
                self._failed.discard(i)
        else:
            time.sleep(policy._setting("backoff_s") * (2 ** self._attempt) * (0.5 + random.random()))
        policy.retried += 1
        self._attempt += 1
