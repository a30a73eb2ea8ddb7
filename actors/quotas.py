"""`QuotaBook`: device-seconds per user (and per group of users) per period, checked before a request
is queued.

The device's `quotas` (its DeviceConfig in the pool file) give limits in device-seconds per period
(`hour`, `day` from local midnight, `week` from Monday 00:00): per user (`users: {alice: 3600}`),
per group (`groups: {students: {members: [carol, dave], device_s: 7200}}`: the members' use summed)
and `default_s` for users not named (none: no limit). A user's use is what the audit log charges
them (`device_s`: their share, by rows, of the device calls they were in), so it survives actor
restarts: `load` sums the log's records of the current period.

A request is refused, before it reaches the device, when the user's use so far, plus what the
user's requests already waiting will use, plus this request's estimated cost, would pass a limit
that applies to them. The estimate is rows x the device's recent seconds per row (an exponential
average over its calls); a request whose user has no limit costs nothing here. The refusal
(`QuotaExceededError`, never retried: it would recur) names the limit, the use so far and when the
period renews.

A pure object on an injected wall clock; the actor calls it under its own lock. Per request: a few
dictionary look-ups.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Callable, Iterable

from .errors import QuotaExceededError

PERIODS = ("hour", "day", "week")
_EWMA = 0.2  # weight of the newest call in the seconds-per-row estimate


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """(start, renewal) of the period containing `now`, in the local time zone."""
    t = datetime.fromtimestamp(now)
    if period == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    elif period == "week":
        start = (t - timedelta(days=t.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=7)
    else:
        raise ValueError(f"quota period must be one of {', '.join(PERIODS)}, got {period!r}")
    return start.timestamp(), end.timestamp()


class QuotaBook:
    def __init__(self, device: str, config: dict, wall: Callable[[], float] = time.time):
        self.device = device
        self.period = config.get("period", "day")
        self.users: dict[str, float] = {k: float(v) for k, v in (config.get("users") or {}).items()}
        self.groups: dict[str, tuple[frozenset, float]] = {
            g: (frozenset(spec["members"]), float(spec["device_s"])) for g, spec in (config.get("groups") or {}).items()}
        self.default_s = config.get("default_s")
        self._wall = wall
        self._start, self._renews = period_bounds(self.period, wall())
        self.used: dict[str, float] = {}  # user -> device-seconds charged this period
        self.pending: dict[str, float] = {}  # user -> estimated seconds of their requests waiting
        self.s_per_row: float | None = None
        self.refused = 0
        # user -> the limits that apply: [(what, limit_s, members or None)], built once per user
        self._limits: dict[str, list] = {}

    # -- the period ----------------------------------------------------------------------------------
    def _roll(self) -> None:
        now = self._wall()
        if now >= self._renews:
            self._start, self._renews = period_bounds(self.period, now)
            self.used.clear()
            self.pending.clear()  # (also forgets estimates of requests dropped unserved)

    def load(self, records: Iterable[dict]) -> None:
        """Charge what the audit log's records of this period say each user used; the log's latest
        requests also give the seconds-per-row estimate back (a restarted actor has seen no call)."""
        self._roll()
        for rec in records:
            if rec.get("outcome") != "ok":
                continue
            self.observe(float(rec.get("device_s", 0.0)), int(rec.get("rows", 0)))
            if rec.get("t", 0.0) >= self._start:
                user = rec.get("user") or "unknown"
                self.used[user] = self.used.get(user, 0.0) + float(rec.get("device_s", 0.0))

    def limits(self, user: str) -> list:
        found = self._limits.get(user)
        if found is None:
            found = []
            own = self.users.get(user, self.default_s)
            if own is not None:
                found.append((f"users.{user}" if user in self.users else "default_s", float(own), None))
            for g, (members, limit) in self.groups.items():
                if user in members:
                    found.append((f"groups.{g}", limit, members))
            self._limits[user] = found
        return found

    # -- the request path ------------------------------------------------------------------------------------
    def estimate(self, rows: int) -> float:
        return rows * (self.s_per_row or 0.0)

    def admit(self, user: str, rows: int) -> float:
        """Check a request of `user` with `rows` rows; returns its estimated cost (to give back to
        `settle` when it is served or dropped). QuotaExceededError when it would overrun a limit."""
        limits = self.limits(user)
        if not limits:
            return 0.0
        self._roll()
        est = self.estimate(rows)
        for what, limit, members in limits:
            names = members if members is not None else (user,)
            used = sum(self.used.get(n, 0.0) for n in names)
            waiting = sum(self.pending.get(n, 0.0) for n in names)
            if used + waiting + est > limit:
                self.refused += 1
                raise self.refusal(user, what, limit, used, waiting, est, rows)
        self.pending[user] = self.pending.get(user, 0.0) + est
        return est

    def settle(self, user: str, est: float, device_s: float | None) -> None:
        """A request admitted with estimate `est` was served (its actual `device_s`) or dropped (None)."""
        if est:
            left = self.pending.get(user, 0.0) - est
            self.pending[user] = left if left > 1e-12 else 0.0
        if device_s:
            self._roll()
            self.used[user] = self.used.get(user, 0.0) + device_s

    def observe(self, elapsed: float, rows: int) -> None:
        """A device call of `rows` rows took `elapsed` s: update the seconds-per-row estimate."""
        if rows > 0:
            per = elapsed / rows
            self.s_per_row = per if self.s_per_row is None else (1 - _EWMA) * self.s_per_row + _EWMA * per

    def refusal(self, user: str, what: str, limit: float, used: float, waiting: float, est: float,
                rows: int) -> QuotaExceededError:
        renews = time.strftime("%Y-%m-%d %H:%M", time.localtime(self._renews))
        queued = f" + {waiting:.2f} s of requests waiting" if waiting > 0 else ""
        return QuotaExceededError(
            f"device '{self.device}': quota exceeded for user '{user}': {what} allows {limit:g} device-seconds "
            f"per {self.period}, used {used:.2f} s so far{queued}; this request ({rows} rows, about {est:.2f} s) "
            f"would pass it. The quota renews at {renews}; wait until then, or raise {what} under the "
            f"device's quotas in the pool file")

    def info(self) -> dict:
        self._roll()
        return {"period": self.period, "renews": self._renews, "used": dict(self.used), "refused": self.refused,
                "users": dict(self.users), "groups": {g: {"members": sorted(m), "device_s": v}
                                                      for g, (m, v) in self.groups.items()},
                "default_s": self.default_s}
