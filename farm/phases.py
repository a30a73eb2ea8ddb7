"""Timestamps of a sweep's phases, for finding where its time goes (bench/sweep_overhead.py).

With PHYSFARM_PHASES set to a file path, every process of a sweep (the driver, the device actors,
each trial's worker: Ray workers inherit the driver's environment) appends one JSON line per phase it
passes: {"phase": name, "t": wall seconds, "pid": process id, ...}. Unset (the default) `mark` costs
one dictionary lookup. Lines are short and appended with one write each (O_APPEND), so processes
writing at once do not interleave within a line.
"""
from __future__ import annotations

import json
import os
import time

ENV = "PHYSFARM_PHASES"


def mark(phase: str, **fields) -> None:
    """Record that this process reached `phase` now (no-op unless $PHYSFARM_PHASES names a file)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"phase": phase, "t": time.time(), "pid": os.getpid(), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read(path) -> list[dict]:
    """The marks in the file at `path`, in time order ([] when there is none)."""
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        return []
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["t"])
