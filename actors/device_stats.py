"""`DeviceStats`: what one device replica has done, in total, recently and per client.

Counts device calls, rows, requests, device errors and refusals; the busy time of the device (calls
in progress included) over the replica's life and over the last `RECENT_WINDOW_S`; and per client id
its requests, rows, queue wait (`wait_s`: from arrival to the start of its device call) and device
seconds (`device_s`: its share, by rows, of the busy time of the calls it was in).

A pure object on an injected monotonic clock (tests/test_device_stats.py runs it on a fake one); it
holds no lock: the actor calls it under its own. Figures are read with `counters`, `clients` and
`active_clients`; `now` in the counters is this clock's time, so the difference of two readings
gives an exact window.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

RECENT_WINDOW_S = 60.0  # utilisation and active clients are reported over this window


@dataclass
class ClientUsage:
    requests: int = 0
    rows: int = 0
    wait_s: float = 0.0
    device_s: float = 0.0
    last_seen: float = 0.0  # clock time of the client's last request
    user: str | None = None  # the person the client's requests are for (the last one named)

    def public(self) -> dict:
        return {"requests": self.requests, "rows": self.rows, "wait_s": self.wait_s, "device_s": self.device_s,
                "user": self.user}


class DeviceStats:
    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = RECENT_WINDOW_S):
        self._clock = clock
        self._window_s = window_s
        self._started = clock()
        self._call_started: float | None = None  # start of the device call in progress
        self._spans: deque[tuple[float, float]] = deque()  # (start, end) of recent device calls
        self._reset()

    def _reset(self) -> None:
        self.calls = 0
        self.rows = 0
        self.requests = 0
        self.errors = 0
        self.refused = 0
        self._busy_s = 0.0
        self._first_request: float | None = None
        self._clients: dict[str, ClientUsage] = {}

    def now(self) -> float:
        return self._clock()

    # -- events ---------------------------------------------------------------------------------------
    def refuse(self) -> None:
        """A request was refused before it was queued (envelope, backpressure, lease)."""
        self.refused += 1

    def arrive(self, client: str, user: str | None = None) -> float:
        """A request of `client` (for `user`) was queued; returns the clock time (its arrival, for `wait_s`)."""
        now = self._clock()
        if self._first_request is None:
            self._first_request = now
        usage = self._client(client)
        usage.last_seen = now
        if user is not None:
            usage.user = user
        return now

    def call_starts(self, waiting: Iterable[tuple[str, float]]) -> float:
        """A device call starts with the requests of (client, arrival) `waiting`; returns its start."""
        start = self._call_started = self._clock()
        for client, arrived in waiting:
            self._client(client).wait_s += start - arrived
        return start

    def call_fails(self) -> float:
        """The device call in progress raised: a device error, its busy time counted, no rows.
        Returns the call's length (s)."""
        elapsed = self._end_call()
        self.errors += 1
        return elapsed

    def call_succeeds(self, served: Sequence[tuple[str, int]]) -> float:
        """The device call in progress answered the (client, rows) `served`: each client's share of
        its busy time goes by rows. Returns the call's length (s)."""
        elapsed = self._end_call()
        total = sum(rows for _, rows in served)
        self.calls += 1
        self.rows += total
        self.requests += len(served)
        for client, rows in served:
            usage = self._client(client)
            usage.requests += 1
            usage.rows += rows
            usage.device_s += elapsed * rows / total
        return elapsed

    def restore(self, calls: int, rows: int, requests: int, errors: int, clients: dict) -> None:
        """Add what an earlier life of this replica counted (rebuilt from its audit log after a
        restart), so that accounting does not start again from zero. `clients`: client id -> an
        object with requests, rows, device_s, wait_s and user. Busy time and utilisation stay this
        life's (they are rates over this life's span)."""
        self.calls += calls
        self.rows += rows
        self.requests += requests
        self.errors += errors
        for cid, old in clients.items():
            usage = self._client(cid)
            usage.requests += old.requests
            usage.rows += old.rows
            usage.device_s += old.device_s
            usage.wait_s += old.wait_s
            usage.user = usage.user or old.user

    def reset(self) -> None:
        """Start counting afresh; of a call in progress, only the time from now on counts."""
        self._reset()
        self._spans.clear()
        if self._call_started is not None:
            self._busy_s = -(self._clock() - self._call_started)

    # -- figures --------------------------------------------------------------------------------------
    @property
    def in_call(self) -> bool:
        return self._call_started is not None

    def counters(self, now: float) -> dict:
        """now, calls, rows, requests, errors, refused, busy_s, span_s, utilisation (over the time
        since the first request), utilisation_recent (over the last window) and in_call."""
        span = (now - self._first_request) if self._first_request is not None else 0.0
        busy = self._busy_now(now)
        window = min(self._window_s, now - self._started)
        return {
            "now": now,
            "calls": self.calls,
            "rows": self.rows,
            "requests": self.requests,
            "errors": self.errors,
            "refused": self.refused,
            "busy_s": busy,
            "span_s": span,
            "utilisation": min(1.0, busy / span) if span > 0 else 0.0,
            "utilisation_recent": min(1.0, self._recent_busy(now) / window) if window > 0 else 0.0,
            "in_call": self.in_call,
        }

    def active_clients(self, now: float, also: Iterable[str] = ()) -> list[str]:
        """Clients seen within the window, with `also` (e.g. the clients with requests queued)."""
        seen = {c for c, u in self._clients.items() if now - u.last_seen <= self._window_s}
        return sorted(seen | set(also))

    def clients(self) -> dict[str, dict]:
        """Per client id: requests, rows, wait_s, device_s, user."""
        return {k: v.public() for k, v in self._clients.items()}

    def users(self, now: float) -> dict[str, dict]:
        """Per user: requests, rows, wait_s, device_s summed over the user's clients, and `active`
        (a request within the window)."""
        out: dict[str, dict] = {}
        for usage in self._clients.values():
            acc = out.setdefault(usage.user or "unknown",
                                 {"requests": 0, "rows": 0, "wait_s": 0.0, "device_s": 0.0, "active": False})
            acc["requests"] += usage.requests
            acc["rows"] += usage.rows
            acc["wait_s"] += usage.wait_s
            acc["device_s"] += usage.device_s
            acc["active"] = acc["active"] or now - usage.last_seen <= self._window_s
        return out

    # -- inside -----------------------------------------------------------------------------------------
    def _client(self, client: str) -> ClientUsage:
        return self._clients.setdefault(client, ClientUsage())

    def _busy_now(self, now: float) -> float:
        return self._busy_s + ((now - self._call_started) if self._call_started is not None else 0.0)

    def _recent_busy(self, now: float) -> float:
        lo = now - self._window_s
        busy = sum(min(e, now) - max(s, lo) for s, e in self._spans if e > lo)
        if self._call_started is not None:
            busy += now - max(self._call_started, lo)
        return busy

    def _end_call(self) -> float:
        end = self._clock()
        start = self._call_started if self._call_started is not None else end
        self._call_started = None
        elapsed = end - start
        self._busy_s += elapsed
        self._spans.append((start, end))
        lo = end - self._window_s
        while self._spans and self._spans[0][1] < lo:
            self._spans.popleft()
        return elapsed
