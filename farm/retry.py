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
"""
from __future__ import annotations

import random
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.errors import DeviceError, DeviceLeasedError, DeviceTimeoutError, EnvelopeError, QuotaExceededError

from .pool import actor_name
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
        if not len(replicas):
            raise RuntimeError(f"DeviceClient('{self.device}') is not connected; call connect() first")
        retries = self._setting("retries") if idempotent else 0
        backoff = self._setting("backoff_s")
        timeout = timeout or self.timeout_s or DEFAULTS["timeout_s"]
        started = time.monotonic()
        attempt, failed = 0, set()  # replicas that lost their actor during this call
        while True:
            i = replica if replica is not None else replicas.pick(avoid=failed)
            handle = replicas.handle(i)
            replicas.sending(i, rows)
            try:
                ref = getattr(handle, method).remote(*args)
                try:
                    return get(ref, timeout)
                except GetTimeoutError:
                    try:
                        ray.cancel(ref)  # the actor drops it if it is still queued
                    except Exception:  # noqa: BLE001 - best effort
                        pass
                    raise DeviceTimeoutError(
                        f"device '{self.device}' ({actor_name(self.device, i)}): no answer to {method} "
                        f"within {timeout:g} s; the device may be hung or overloaded (`physfarm devices "
                        f"ls`), or raise call_timeout_s in the device config") from None
            except NOT_RETRIED:
                raise
            except (RayActorError, DeviceError) as err:
                if attempt >= retries:
                    raise self._give_up(err, method, i, attempt, time.monotonic() - started) from err
                if isinstance(err, RayActorError):
                    failed.add(i)
                    if replica is not None or len(failed) >= len(replicas):
                        # No other replica to go to: wait for this one to be restarted.
                        deadline = started + self._setting("restart_wait_s")
                        if not replicas.await_restart(i, deadline):
                            raise self._give_up(err, method, i, attempt, time.monotonic() - started,
                                                dead=True) from err
                        failed.discard(i)
                else:
                    time.sleep(backoff * (2 ** attempt) * (0.5 + random.random()))
                self.retried += 1
                attempt += 1
            finally:
                replicas.answered(i, rows)

    def _give_up(self, err: Exception, method: str, replica: int, attempt: int, elapsed: float,
                 dead: bool = False) -> DeviceError:
        tries = f"after {attempt + 1} attempt{'s' if attempt else ''} over {elapsed:.2f} s (retries={attempt})"
        if isinstance(err, RayActorError):
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            why = ("its actor is gone (max_restarts spent, or stopped)" if dead else
                   "check `physfarm devices ls`")
            return DeviceError(
                f"device '{self.device}' ({actor_name(self.device, replica)}) is unavailable for {method} "
                f"{tries}: {type(err).__name__}: {first[:200]}; {why}")
        cls = type(err) if isinstance(err, DeviceError) else DeviceError
        return cls(f"{err} [{method} failed {tries}]")
