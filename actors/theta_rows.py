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
