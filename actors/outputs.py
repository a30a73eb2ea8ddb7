"""Which outputs of a device carry signal: the rule shared by a recorded device's data check and the
trainers' readouts, so "dead" means the same everywhere.

An output's spread is the range of the middle 90 % of its values over a set of rows (a calibration
batch, or a measured file): robust to a few stray rows, such as a placeholder row of zeros. An output
is dead when its spread is below `tolerance` times the largest output's spread.
"""
from __future__ import annotations

import numpy as np

DEAD_TOLERANCE = 0.01


def output_spread(y) -> np.ndarray:
    """[n_outputs] spread of y [rows, n_outputs] (numpy or torch)."""
    y = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y, dtype=np.float64)
    if y.shape[0] < 2:
        return np.zeros(y.shape[1])
    lo, hi = np.percentile(y, [5.0, 95.0], axis=0)
    return hi - lo


def dead_outputs(y, tolerance: float = DEAD_TOLERANCE) -> list[int]:
    """The outputs (0-based) of y [rows, n_outputs] whose spread is below tolerance x the largest."""
    spread = output_spread(y)
    top = float(spread.max()) if spread.size else 0.0
    return [] if top == 0.0 else np.flatnonzero(spread < tolerance * top).tolist()
