"""`ReservationBook`: time windows in which a device serves one user only, kept in a file.

A reservation books [start, end) (wall-clock seconds) for a user. While one is in force the device
admits only that user's requests; the actor applies its lease policy to the others (refused at once,
or held until the window ends). Windows of one device never overlap: `add` refuses an overlap,
naming the reservation in the way. Each change is written to a JSON file on the device's node
(beside its audit log, atomically: a new file renamed over the old), which a restarted actor reads
back, so reservations survive restarts. Windows that have ended are dropped when the book is saved.

A pure object on an injected wall clock (tests/test_reservations.py); the actor calls it under its
own lock. `admits` is on the request path: with no window in force it costs a comparison.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import DeviceLeasedError

MAX_AHEAD_S = 366 * 86400.0  # a booking more than a year ahead is a typo


def _fmt(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


@dataclass
class Reservation:
    id: str
    user: str
    start: float
    end: float
    by: str  # who booked it (may book for another user)
    note: str = ""

    def public(self) -> dict:
        return {**asdict(self), "start_text": _fmt(self.start), "end_text": _fmt(self.end)}

    def describe(self) -> str:
        return f"{self.user} from {_fmt(self.start)} to {_fmt(self.end)} (id {self.id})"


class ReservationBook:
    def __init__(self, device: str, path: Path | None = None, wall: Callable[[], float] = time.time):
        self.device = device
        self.path = Path(path) if path is not None else None
        self._wall = wall
        self._items: list[Reservation] = []  # sorted by start
        self._loaded = False
        # The window in force is looked up again only after `_recheck` (the next start or end).
        self._current: Reservation | None = None
        self._recheck = -float("inf")

    # -- persistence ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Read the book from its file (once; a missing file is an empty book)."""
        if self._loaded:
            return
        self._loaded = True
        if self.path is None or not self.path.exists():
            return
        raw = json.loads(self.path.read_text() or "[]")
        self._items = sorted((Reservation(**r) for r in raw), key=lambda r: r.start)
        self._recheck = -float("inf")

    def _save(self) -> None:
        now = self._wall()
        self._items = [r for r in self._items if r.end > now]
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps([asdict(r) for r in self._items], indent=1))
        os.replace(tmp, self.path)

    # -- booking ---------------------------------------------------------------------------------------
    def add(self, user: str, start: float, end: float, by: str | None = None, note: str = "",
            rid: str | None = None) -> dict:
        """Book [start, end) for `user`. ValueError naming the field for a bad window, and the
        reservation in the way for an overlap."""
        self.load()
        now = self._wall()
        if not isinstance(user, str) or not user.strip():
            raise ValueError(f"reservation user must be a non-empty name, got {user!r}")
        if not end > start:
            raise ValueError(f"reservation of device '{self.device}': --to ({_fmt(end)}) must be after "
                             f"--from ({_fmt(start)})")
        if end <= now:
            raise ValueError(f"reservation of device '{self.device}' ends at {_fmt(end)}, which is past; "
                             f"give a window that ends in the future")
        if start - now > MAX_AHEAD_S:
            raise ValueError(f"reservation of device '{self.device}' starts more than a year ahead "
                             f"({_fmt(start)}); check --from")
        for other in self._items:
            if other.start < end and start < other.end and other.end > now:
                raise ValueError(
                    f"device '{self.device}' is already reserved for {other.describe()}, which overlaps "
                    f"{_fmt(start)}-{_fmt(end)}; pick a window outside it (`physfarm devices reservations "
                    f"{self.device}` lists them), or ask {other.by} to cancel it")
        res = Reservation(rid or uuid.uuid4().hex[:8], user.strip(), float(start), float(end), by or user, note)
        self._items = sorted([*self._items, res], key=lambda r: r.start)
        self._recheck = -float("inf")
        self._save()
        return res.public()

    def cancel(self, rid: str) -> dict:
        """Remove the reservation `rid`; KeyError naming the ids there are."""
        self.load()
        found = next((r for r in self._items if r.id == rid), None)
        if found is None:
            raise KeyError(f"no reservation '{rid}' on device '{self.device}' (there are: "
                           f"{', '.join(r.id for r in self._items) or 'none'})")
        self._items.remove(found)
        self._recheck = -float("inf")
        self._save()
        return found.public()

    def list(self) -> list[dict]:
        """Reservations in force or ahead, by start."""
        self.load()
        now = self._wall()
        return [r.public() for r in self._items if r.end > now]

    # -- the request path --------------------------------------------------------------------------------
    def current(self) -> Reservation | None:
        """The reservation in force now, or None (cheap: looked up again only at a window's edge)."""
        now = self._wall()
        if now >= self._recheck:
            self.load()
            self._current = next((r for r in self._items if r.start <= now < r.end), None)
            upcoming = [r.start for r in self._items if r.start > now]
            self._recheck = self._current.end if self._current else min(upcoming, default=float("inf"))
        return self._current

    def admits(self, user: str) -> bool:
        res = self.current()
        return res is None or res.user == user

    def remaining_s(self) -> float | None:
        """Seconds until the window in force ends; None when none is."""
        res = self.current()
        return None if res is None else max(0.0, res.end - self._wall())

    def refusal(self, name: str, user: str) -> DeviceLeasedError:
        res = self.current()
        return DeviceLeasedError(
            f"device '{self.device}' ({name}) is reserved for {res.describe() if res else '?'}; requests of "
            f"'{user}' are not served in that window; wait until it ends, use another device, or ask "
            f"{res.by if res else 'its owner'} to cancel it (`physfarm devices reservations {self.device}`)")
