"""What callers depend on: the `PhysicalSystem` protocol (simulators, drivers, user systems)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .spec import SystemSpec


@runtime_checkable
class PhysicalSystem(Protocol):
    """A controllable physical system.

    `forward(x[B, n_inputs], theta[B, n_params] or theta[n_params]) -> y[B, n_outputs]` measures one
    row per sample; parameters come per row so rows of different trials can share one device call.
    `ideal_model()` returns a differentiable torch module of the nominal physics with the same call
    signature (no noise; it differs from the device by the configured mismatch).
    `connect()`/`close()` do the I/O (a simulator's are no-ops); constructors never do I/O.
    """

    @property
    def spec(self) -> SystemSpec: ...

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor: ...

    def ideal_model(self) -> torch.nn.Module: ...

    def connect(self) -> None: ...

    def close(self) -> None: ...
