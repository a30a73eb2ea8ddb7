"""Theta of a device call: the one place where a request's theta[n_params] becomes one row per sample.

Requests carry one parameter vector each. `PhysicalSystem.forward` takes theta[rows, n_params] (one
row per sample, so that rows of several requests can share a call) or, from systems that say they
take it (`accepts_shared_theta`), one theta[n_params] for a call whose rows all share it. Both the
device actor (building a call from queued requests: `call_theta`) and the simulators (handed a
theta[n_params]: `expand_rows`) expand theta here, so a call's theta is expanded exactly once.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def accepts_shared_theta(system) -> bool:
    """Whether `system.forward` may be called with one theta[n_params] for all rows (broadcast by the
    system) instead of theta[rows, n_params]. A system says so with a class attribute
    `accepts_shared_theta = True`; the simulators (`SimulatedSystem`, whose forward broadcasts a 1-D
    theta) do. Any other system (user systems, instruments) gets the documented theta[rows, n_params]."""
    return bool(getattr(system, "accepts_shared_theta", False))


def expand_rows(theta: torch.Tensor, rows: int) -> torch.Tensor:
    """theta[n_params] as theta[rows, n_params]: a view, no copy (rows share its memory, which
    systems such as the oscillators detect to compute once per call); theta[rows, n_params] as is."""
    return theta.expand(rows, -1) if theta.ndim == 1 else theta


def call_theta(thetas: Sequence[np.ndarray], sizes: Sequence[int], shared: bool) -> torch.Tensor:
    """theta of one device call made of requests with theta[n_params] `thetas` and `sizes` rows.

    theta[n_params] when `shared` (the system takes a shared theta) and every request carries the
    same vector (one client's requests, the common case: no [rows, n_params] copy, e.g. 256 x 4160
    floats = 4 MB for oscillators, and the system can use it once per call); else one row per
    sample, theta[rows, n_params] (the documented contract). Always a fresh tensor: the system may
    keep or modify its input, and Ray hands the actor read-only buffers.
    """
    # Built in numpy and handed to torch once: small torch ops release the GIL, and the device thread
    # then waits to get it back from the actor's event-loop thread (up to Python's 5 ms switch
    # interval) while the device idles between calls (P1 fell from 0.977 to 0.93 with torch here).
    first = thetas[0]
    if shared and all(t is first or np.array_equal(t, first) for t in thetas[1:]):
        return torch.from_numpy(np.array(first, dtype=np.float32))
    return torch.from_numpy(np.concatenate([np.broadcast_to(t, (n, t.shape[0])) for t, n in zip(thetas, sizes)]))


def splits_by_theta(system) -> bool:
    """Whether a call whose rows carry several thetas is cheaper as one shared-theta forward per theta
    than as one forward with a theta row per sample. A system says so with a class attribute
    `splits_by_theta = True` (it must also take a shared theta): the oscillators do, whose per-row
    theta builds a coupling matrix for every row (256 rows of 4 trials' thetas: 30 ms per row, 5 ms as
    four calls); for the other simulators one merged call is as cheap or cheaper."""
    return accepts_shared_theta(system) and bool(getattr(system, "splits_by_theta", False))


def theta_runs(thetas: Sequence[np.ndarray], sizes: Sequence[int]) -> list[tuple[int, int, torch.Tensor]]:
    """The rows of a call made of requests with theta[n_params] `thetas` and `sizes` rows, as runs of
    consecutive rows sharing one theta: [(first row, end row, theta[n_params])], in row order; requests
    next to each other with the same theta (one client's) share a run."""
    runs: list[tuple[int, int, np.ndarray]] = []
    start = 0
    for t, n in zip(thetas, sizes):
        if runs and (runs[-1][2] is t or np.array_equal(runs[-1][2], t)):
            runs[-1] = (runs[-1][0], start + n, runs[-1][2])
        else:
            runs.append((start, start + n, t))
        start += n
    return [(a, b, torch.from_numpy(np.array(t, dtype=np.float32))) for a, b, t in runs]
