"""`FairQueue`: the requests waiting for a device, one queue per client, taken round-robin.

A pure object (no threads, no Ray, no clock): the device actor drives it under its own lock, and the
tests drive it directly (tests/test_fair_queue.py). Fairness is counted in turns (device calls), not
in time, so no clock is needed: a batch takes one request per client per round, least recently
served client first, until the next request would exceed the call's row limit. A client with a long
queue of big requests thus gets one request per call while every other waiting client also gets
one: it cannot starve them.

Priority classes (optional): each client has a class (0 first, then 1, ...; given with `push`). A
batch takes the higher classes' clients first, round-robin inside each class as above, so fairness
holds inside a class. A lower class is not starved: when it has had items waiting through
`max_skips` batches in a row without one of them served, it goes first in the next batch (of the
classes so due, the one that has waited longest). So a waiting class goes unserved through at most
`max_skips + C - 1` batches in a row, C the number of classes in use: `max_skips` with two classes
(tests/test_priorities.py checks both properties on random workloads). With every client in class 0 nothing of this runs.

Items are whatever the caller queues; the queue only reads `item.rows` (how many rows the item
brings). Two predicates come from the caller: `is_dead(item)` at construction (an item its sender
gave up on, e.g. a cancelled future: dropped when met, never served) and `admits(item)` per call
(whether the item may be served now, e.g. while a lease holds the device).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Generic, Iterable, Protocol, TypeVar


class Queued(Protocol):
    rows: int


T = TypeVar("T", bound=Queued)

# Turns remembered per client: beyond this many clients, those with nothing queued are forgotten
# (a long-gone client then counts as never served, which only helps it).
FORGET_AFTER = 100_000


def _never_dead(item) -> bool:
    return False


def _admit_all(item) -> bool:
    return True


class FairQueue(Generic[T]):
    def __init__(self, is_dead: Callable[[T], bool] = _never_dead, forget_after: int = FORGET_AFTER,
                 max_skips: int = 4):
        self._is_dead = is_dead
        self._forget_after = forget_after
        if max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {max_skips!r}")
        self.max_skips = max_skips
        self._class: dict[str, int] = {}  # client -> its priority class, only for classes > 0
        self._skipped: dict[int, int] = {}  # class -> batches in a row it waited through unserved
        # client -> its waiting items, in arrival order. A client's entry exists only while it has
        # items; re-added, it goes to the end (ties in `take` keep this order).
        self._queues: dict[str, deque[T]] = {}
        self._last_served: dict[str, int] = {}  # client -> stamp of its last service (one per service)
        self._turn = 0
        self._rows = 0

    # -- reading ------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows waiting (items given up on but not yet met still count)."""
        return self._rows

    def __len__(self) -> int:
        """Items waiting (items given up on but not yet met still count)."""
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        """Whether anything waits (cheap: no count)."""
        return bool(self._queues)

    def clients(self) -> list[str]:
        """The clients with items waiting, in queue order."""
        return list(self._queues)

    # -- writing ------------------------------------------------------------------------------------
    def push(self, client: str, items: Iterable[T], priority: int = 0) -> None:
        """Queue `items` (in this order) behind `client`'s earlier ones; `priority` is the client's
        class (0: first)."""
        items = list(items)
        if not items:
            return
        if priority:
            self._class[client] = priority
        elif self._class:
            self._class.pop(client, None)
        self._queues.setdefault(client, deque()).extend(items)
        self._rows += sum(item.rows for item in items)

    def ready(self, admits: Callable[[T], bool] = _admit_all) -> bool:
        """Whether some client's next live item is admitted (a batch would not be empty)."""
        for client in list(self._queues):
            item = self._head(client)
            if item is not None and admits(item):
                return True
        return False

    def take(self, limit: int, admits: Callable[[T], bool] = _admit_all) -> list[T]:
        """The next batch: round-robin over clients, least recently served first, one admitted item
        each per round, until the next item would take the batch past `limit` rows. The first item
        is taken whatever its size (the caller splits requests larger than a call beforehand)."""
        batch: list[T] = []
        served: list[str] = []
        rows = 0
        if self._class:  # priority classes in use: higher first, a class waiting too long first of all
            waiting = {self._class.get(c, 0) for c in self._queues}
            # The one class that has waited longest, if that is max_skips batches or more, goes first.
            due = [k for k in waiting if self._skipped.get(k, 0) >= self.max_skips]
            promoted = min(due, key=lambda k: (-self._skipped.get(k, 0), k)) if due else None

            def key(c: str):
                k = self._class.get(c, 0)
                return (k != promoted, k, self._last_served.get(c, -1))

            order = sorted(self._queues, key=key)
        else:
            order = sorted(self._queues, key=lambda c: self._last_served.get(c, -1))  # stable: ties by queue order
        while order:
            progressed = False
            for client in order:
                if client not in self._queues:
                    continue
                item = self._head(client)
                if item is None or not admits(item):
                    continue
                if batch and rows + item.rows > limit:
                    continue
                queue = self._queues[client]
                queue.popleft()
                batch.append(item)
                served.append(client)
                rows += item.rows
                progressed = True
                if not queue:
                    del self._queues[client]
                if rows >= limit:
                    break
            if rows >= limit or not progressed:
                break
        if batch and self._class:
            got = {self._class.get(c, 0) for c in served}
            self._skipped = {k: 0 if k in got else self._skipped.get(k, 0) + 1 for k in waiting}
        if batch:
            # One stamp per service, in the batch's order: clients served together are not tied
            # (a tie broken by queue order would favour the same client every time a batch has
            # room for only some of them, as when a promoted class takes a place).
            for client in served:
                self._turn += 1
                self._last_served[client] = self._turn
            if len(self._last_served) > self._forget_after:
                self._last_served = {c: t for c, t in self._last_served.items() if c in self._queues}
        self._rows -= rows
        return batch

    def remove_unless(self, keep: Callable[[T], bool]) -> list[T]:
        """Drop the dead items and take out the live ones `keep` refuses; return those (in queue
        order) so the caller can answer them. The kept ones stay in order."""
        removed: list[T] = []
        for client in list(self._queues):
            kept: deque[T] = deque()
            for item in self._queues[client]:
                if self._is_dead(item):
                    self._rows -= item.rows
                elif keep(item):
                    kept.append(item)
                else:
                    self._rows -= item.rows
                    removed.append(item)
            if kept:
                self._queues[client] = kept
            else:
                del self._queues[client]
        return removed

    # -- inside -------------------------------------------------------------------------------------
    def _head(self, client: str) -> T | None:
        """The client's first live item; dead ones in front are dropped (and its entry, if empty)."""
        queue = self._queues[client]
        while queue and self._is_dead(queue[0]):
            self._rows -= queue.popleft().rows
        if not queue:
            del self._queues[client]
            return None
        return queue[0]
