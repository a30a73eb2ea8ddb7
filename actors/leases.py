"""`LeaseTable`: who holds a device exclusively, until when, and which requests that lease admits.

A holder may reserve the device (`acquire`). While a lease is active the device serves only requests
that carry the lease token or come from a client id equal to the holder or under it (`holder/...`,
e.g. the trials of a sweep named `holder`). The others are refused at once (policy "refuse") or wait
in the queue until the lease ends (policy "wait"); the actor applies the policy, this table says
which. A lease ends at its `until` time, on `release`, or when its holder stops sending heartbeats
(renewals) for `heartbeat_s` seconds, so a lease whose holder died lapses on its own. A lease is
bound to a secret token: another client cannot renew, take over or release it.

A pure object on injected clocks (tests/test_leases.py runs it on a fake one): `wall` for the lease
end, a wall time people read and give (time.time), and `mono` for heartbeats, which must not jump
when the wall clock is set (time.monotonic). It holds no lock: the actor calls it under its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .errors import DeviceLeasedError

POLICIES = ("refuse", "wait")
MAX_HEARTBEAT_S = 3600.0


def format_wall(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@dataclass
class Lease:
    holder: str
    token: str
    until: float  # wall clock: the lease's end
    heartbeat_s: float  # lapses when no heartbeat came for this long
    last_beat: float  # monotonic clock: the last heartbeat
    job: str | None  # the holder's Ray job id, for people reading `devices ls`
    since: float  # wall clock: when the lease began

    def remaining_s(self, wall: float, mono: float) -> float:
        if self.heartbeat_s == 0:  # a lease with no heartbeat (from the command line): until its end
            return self.until - wall
        return min(self.until - wall, self.last_beat + self.heartbeat_s - mono)

    def public(self, wall: float, mono: float) -> dict:
        return {"holder": self.holder, "until": self.until, "until_text": format_wall(self.until),
                "since": self.since, "heartbeat_s": self.heartbeat_s, "job": self.job,
                "remaining_s": max(0.0, self.remaining_s(wall, mono))}


def _no_op() -> None:
    pass


class LeaseTable:
    """The lease of one device replica (at most one at a time).

    `device` and `name` (e.g. 'osc' and 'osc#0') only name the replica in refusals. `on_end` is
    called whenever the lease in force ends (lapsed, or released), so that requests held back by a
    "wait" lease can be woken.
    """

    def __init__(self, device: str, name: str, policy: str = "refuse", max_lease_s: float = 7 * 86400.0,
                 wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic,
                 on_end: Callable[[], None] = _no_op):
        if policy not in POLICIES:
            raise ValueError(f"lease_policy must be 'refuse' or 'wait', got {policy!r}")
        self.device, self.name, self.policy, self.max_lease_s = device, name, policy, max_lease_s
        self._wall, self._mono, self._on_end = wall, mono, on_end
        self._lease: Lease | None = None
        # A lease without heartbeat is kept in this file (if set), so that it outlives an actor restart.
        self.path = None

    # -- the lease in force ---------------------------------------------------------------------------
    def active(self) -> Lease | None:
        """The lease in force; one that has ended is dropped here (and `on_end` called)."""
        lease = self._lease
        if lease is not None and lease.remaining_s(self._wall(), self._mono()) <= 0:
            self._lease = None
            lease = None
            self._on_end()
        return lease

    def remaining_s(self) -> float | None:
        """Seconds until the lease in force ends (at its end or its missed heartbeat); None if none."""
        lease = self.active()
        return None if lease is None else lease.remaining_s(self._wall(), self._mono())

    def info(self) -> dict | None:
        """The lease in force as plain data (holder, until, remaining_s, ...), or None."""
        lease = self.active()
        return None if lease is None else lease.public(self._wall(), self._mono())

    def admits(self, client: str, token: str | None, user: str | None = None) -> bool:
        """Whether a request of `client` (carrying `token`, for `user`) may be served now: the holder
        is a client id (its own and those under it, `holder/...`) or a person."""
        lease = self.active()
        if lease is None:
            return True
        return (token == lease.token or client == lease.holder or client.startswith(lease.holder + "/")
                or user == lease.holder)

    def refuses(self, client: str, token: str | None, user: str | None = None) -> bool:
        """Whether such a request must be refused at once (a lease holds the device, policy "refuse")."""
        return self.policy == "refuse" and not self.admits(client, token, user)

    def refusal(self, lease: Lease, what: str) -> DeviceLeasedError:
        """The error a request (or lease request) refused because of `lease` gets."""
        return DeviceLeasedError(
            f"device '{self.device}' ({self.name}) is reserved by '{lease.holder}' until "
            f"{format_wall(lease.until)} ({what}); wait until then, use another device, or ask "
            f"'{lease.holder}' to release it (a lease cannot be taken over)"
        )

    # -- changing it -----------------------------------------------------------------------------------
    def acquire(self, holder: str, token: str, until: float, heartbeat_s: float = 10.0,
                job: str | None = None) -> tuple[dict, bool]:
        """Reserve the device for `holder` until the wall time `until`, or renew (same token: a
        heartbeat). Returns the lease as plain data and whether it is new (the caller then applies
        the policy to what is queued) rather than renewed. Raises ValueError for a bad argument and
        DeviceLeasedError when another token holds the device."""
        if not isinstance(holder, str) or not holder.strip():
            raise ValueError(f"lease holder must be a non-empty name, got {holder!r}")
        if not isinstance(token, str) or len(token) < 8:
            raise ValueError("lease token must be a string of at least 8 characters (use uuid4().hex)")
        now = self._wall()
        if not until > now:
            raise ValueError(f"lease end {format_wall(until)} is not in the future; give seconds > 0")
        if until - now > self.max_lease_s + 1.0:
            raise ValueError(f"lease of {until - now:.0f} s on device '{self.device}' exceeds the "
                             f"device's max_lease_s={self.max_lease_s:.0f}; ask for less")
        if not 0 <= heartbeat_s <= MAX_HEARTBEAT_S:
            raise ValueError(f"heartbeat_s must be in [0, {MAX_HEARTBEAT_S:g}] (0: no heartbeat, the lease "
                             f"lasts until its end or release), got {heartbeat_s!r}")
        lease = self.active()
        if lease is not None and lease.token != token:
            raise self.refusal(lease, "lease requested by '" + holder + "' refused")
        began = lease is None
        if began:
            lease = self._lease = Lease(holder, token, until, heartbeat_s, self._mono(), job, since=now)
        else:
            lease.until, lease.heartbeat_s, lease.last_beat = until, heartbeat_s, self._mono()
        self._save()
        return lease.public(self._wall(), self._mono()), began

    def release(self, token: str) -> bool:
        """End the lease held with `token`. False if there was none; DeviceLeasedError for another's."""
        lease = self.active()
        if lease is None:
            return False
        if lease.token != token:
            raise self.refusal(lease, "only its holder can release it")
        self._lease = None
        self._save()
        self._on_end()
        return True

    # -- keeping a lease without heartbeat across restarts -------------------------------------------------
    def _save(self) -> None:
        if self.path is None:
            return
        import json
        import os
        from pathlib import Path

        lease = self._lease
        path = Path(self.path)
        if lease is None or lease.heartbeat_s != 0:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"holder": lease.holder, "token": lease.token, "until": lease.until,
                                   "job": lease.job, "since": lease.since}))
        os.chmod(tmp, 0o600)  # the token releases the lease
        os.replace(tmp, path)

    def load(self) -> None:
        """Take back a lease without heartbeat that an earlier life of the actor held (if not ended)."""
        import json
        from pathlib import Path

        if self.path is None or self._lease is not None or not Path(self.path).exists():
            return
        raw = json.loads(Path(self.path).read_text())
        if raw["until"] > self._wall():
            self._lease = Lease(raw["holder"], raw["token"], raw["until"], 0.0, self._mono(), raw.get("job"),
                                since=raw.get("since", self._wall()))
