"""`AuditLog`: every device call, appended to a JSON-lines file on the device's node.

One line per request served (or refused, or failed) by a replica, in its own file
`AUDIT_DIR/<device>.<replica>.jsonl`:

    {"t": 1764757200.123, "user": "alice", "run": "alice-sweep/3f2a_00001", "rows": 64,
     "theta": "9c1d0a7e", "duration_s": 0.0125, "device_s": 0.0031, "wait_s": 0.0004,
     "outcome": "ok", "call": "1764757000.5-812", "k": 0}

`t` is the wall time the device call started (seconds since the epoch), `duration_s` that call's
length, `device_s` this request's share of it by rows, `theta` a CRC-32 of the request's parameters
(to tell which parameters were measured, not a secret), `call` names the device call (this actor
life's start time and its call number; `k` is the request's place in that call). `outcome` is `ok`,
`error: ...` (the device call raised) or `refused: ...` (refused before the device saw it: quota,
lease, reservation, envelope, full queue; duration 0). Lines with an `event` key mark actor starts
(`{"t": ..., "event": "start", "restarted": true, "pid": ...}`) and are not requests.

Cost and durability. The lines of one device call are written with a single `write` on a file
opened with O_APPEND, by the device thread after the call and before its answers go out: a few
microseconds per call next to a device call of milliseconds (P4's details measure it: `audit_write_us`),
nothing on the threads that take requests, and an answered request is always in the file, even if
the actor is killed the next instant (the kernel holds what was written; only a machine crash can
lose the last lines, as no fsync is made). Buffering the lines in the process and writing them later
would save those microseconds but lose the answered requests of a killed actor (S2, the audit's
completeness, would break): issue 19 measured the write and kept it unbuffered. The
file survives actor restarts: a restarted actor appends to it and rebuilds its accounting from it
(`replay`). A write that fails (disk full) does not fail the requests; it is counted (`errors`).
"""
from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

AUDIT_DIR_ENV = "PHYSFARM_AUDIT_DIR"
DEFAULT_DIR = "~/.physfarm/audit"


def audit_dir(configured: str | None = None) -> Path:
    """The config's folder, else $PHYSFARM_AUDIT_DIR, else ~/.physfarm/audit (on the device's node)."""
    return Path(configured or os.environ.get(AUDIT_DIR_ENV) or DEFAULT_DIR).expanduser()


def audit_path(folder: Path, device: str, replica: int) -> Path:
    return folder / f"{device}.{replica}.jsonl"


def theta_hash(theta) -> str:
    """CRC-32 of theta's bytes, 8 hex digits (theta: a contiguous float32 array)."""
    return f"{zlib.crc32(memoryview(theta).cast('B')):08x}"


class AuditLog:
    """The audit file of one replica. Opened lazily (the actor's constructor does no I/O)."""

    def __init__(self, path: Path, clock=time.time):
        self.path = Path(path)
        self._clock = clock
        self._fd: int | None = None
        self._names: dict[str, str] = {}  # a name -> its JSON string (names repeat: escape once)
        self.errors = 0
        self.last_error: str | None = None
        self._life = f"{clock():.3f}"
        self._calls = 0

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return self._fd

    def _q(self, name: str) -> str:
        quoted = self._names.get(name)
        if quoted is None:
            if len(self._names) > 100_000:
                self._names.clear()
            quoted = self._names[name] = json.dumps(name)
        return quoted

    def _write(self, text: str) -> None:
        try:
            os.write(self._open(), text.encode())
        except OSError as err:
            self.errors += 1
            self.last_error = f"{self.path}: {err.strerror or err}"

    # -- events ---------------------------------------------------------------------------------------
    def started(self, restarted: bool) -> None:
        self._write(json.dumps({"t": round(self._clock(), 6), "event": "start", "restarted": bool(restarted),
                                "pid": os.getpid()}) + "\n")

    def call(self, t0: float, duration_s: float, requests: Iterable[tuple], outcome: str = "ok") -> None:
        """One device call that started at wall time t0: `requests` are (user, run, rows, theta,
        device_s, wait_s) in call order."""
        self._calls += 1
        cid = f'"{self._life}-{self._calls}"'
        out = self._q(outcome)
        lines = [
            f'{{"t": {t0:.6f}, "user": {self._q(user)}, "run": {self._q(run)}, "rows": {rows}, '
            f'"theta": "{theta_hash(theta)}", "duration_s": {duration_s:.6f}, "device_s": {device_s:.6f}, '
            f'"wait_s": {wait_s:.6f}, "outcome": {out}, "call": {cid}, "k": {k}}}\n'
            for k, (user, run, rows, theta, device_s, wait_s) in enumerate(requests)
        ]
        self._write("".join(lines))

    def refused(self, user: str, run: str, rows: int, theta, why: str) -> None:
        self._write(
            f'{{"t": {self._clock():.6f}, "user": {self._q(user)}, "run": {self._q(run)}, "rows": {rows}, '
            f'"theta": "{theta_hash(theta) if theta is not None else ""}", "duration_s": 0.0, '
            f'"device_s": 0.0, "wait_s": 0.0, "outcome": {json.dumps("refused: " + why)}}}\n')

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


# -- reading ----------------------------------------------------------------------------------------
def read(path: Path, since: float | None = None) -> Iterator[dict]:
    """The records of an audit file (request lines and events), oldest first, from `since` (wall s).
    A torn last line (a write cut by a machine crash) is skipped."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return
    with handle:
        for raw in handle:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if since is None or rec.get("t", 0.0) >= since:
                yield rec


@dataclass
class Usage:
    requests: int = 0
    rows: int = 0
    device_s: float = 0.0
    wait_s: float = 0.0
    user: str | None = None

    def add(self, rec: dict) -> None:
        self.requests += 1
        self.rows += int(rec.get("rows", 0))
        self.device_s += float(rec.get("device_s", 0.0))
        self.wait_s += float(rec.get("wait_s", 0.0))
        self.user = rec.get("user", self.user)


@dataclass
class Replay:
    """What an audit file says a replica did: totals and per-run (client) usage, restarts."""

    calls: int = 0
    rows: int = 0
    requests: int = 0
    errors: int = 0
    refused: int = 0
    restarts: int = 0
    clients: dict[str, Usage] = field(default_factory=dict)


def replay(records: Iterable[dict]) -> Replay:
    """The current lineage's totals: from the last fresh start (a start that was not a restart; a
    device stopped and started again begins afresh) to the end."""
    out = Replay()
    for rec in records:
        if "event" in rec:
            if rec.get("event") == "start" and not rec.get("restarted"):
                out = Replay()
            else:
                out.restarts += bool(rec.get("restarted"))
            continue
        outcome = rec.get("outcome", "")
        if outcome == "ok":
            if rec.get("k") == 0:
                out.calls += 1
            out.rows += int(rec.get("rows", 0))
            out.requests += 1
            out.clients.setdefault(str(rec.get("run")), Usage()).add(rec)
        elif outcome.startswith("error"):
            out.errors += rec.get("k") == 0
        else:
            out.refused += 1
    return out
