"""Shared machinery of the simulators: the realism knobs every lab device has.

A simulator is a nominal physics (`ideal_model()`) plus, in the "real" device, a fixed seeded
mismatch, per-measurement noise, slow drift, an ADC, a latency that is really slept and optional
faults. Subclasses implement `_measure` (the device physics with mismatch/drift, noise included)
and `ideal_model`; this base class validates, broadcasts theta, injects faults and sleeps.

Random streams (all seeded from `config.seed`, each independent of the others so that switching one
effect on or off never changes another's sequence):
  seed + 0: the fixed mismatch (the device's fabrication error; drawn once, in the constructor)
  seed + 1: measurement noise          seed + 2: faults          seed + 3: drift random walks
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..envelope import check_request
from ..errors import DeviceError
from ..spec import SystemSpec
from ..theta_rows import expand_rows
from .configs import SimConfig




def quantise(y: torch.Tensor, full_scale: tuple[float, float], bits: int | None,
             straight_through: bool = True) -> torch.Tensor:
    """An ADC: clip to full scale (saturation: zero gradient outside, as in the hardware) and round to
    2**bits - 1 steps. `bits=None` is an ideal converter (no clipping, no rounding).

    The rounding passes gradients straight through (d round(y)/dy := 1), so an ideal model that
    includes the known ADC stays usefully differentiable while its values equal the device's.
    """
    if bits is None:
        return y
    lo, hi = full_scale
    y = y.clamp(lo, hi)
    step = (hi - lo) / (2**bits - 1)
    q = lo + torch.round((y - lo) / step) * step
    return y + (q - y).detach() if straight_through else q


class RandomWalk:
    """A seeded Gaussian random walk advanced by the drift clock: after a clock advance of dt (calls
    or seconds), the state moves by N(0, (step * sqrt(dt))**2) element-wise, so its spread grows as
    sqrt(elapsed) like a temperature or a slowly wandering alignment."""

    def __init__(self, shape: tuple[int, ...], step: float, generator: torch.Generator):
        self.state = torch.zeros(shape)
        self.step = float(step)
        self._gen = generator
        self._clock = 0.0

    def advance(self, clock: float) -> torch.Tensor:
        dt = clock - self._clock
        if dt > 0 and self.step > 0:
            self.state = self.state + self.step * math.sqrt(dt) * torch.randn(
                self.state.shape, generator=self._gen)
        self._clock = max(self._clock, clock)
        return self.state


class SimulatedSystem:
    """Base class of the simulators (shares code; callers depend on the `PhysicalSystem` protocol)."""

    config_class: type[SimConfig] = SimConfig
    accepts_shared_theta = True  # forward broadcasts a theta[n_params] itself (actors.theta_rows)

    def __init__(self, config: SimConfig | dict | None = None, **overrides):
        if config is None or isinstance(config, dict):
            config = self.config_class.model_validate({**(config or {}), **overrides})
        elif overrides:
            config = self.config_class.model_validate({**config.model_dump(), **overrides})
        self.config = config
        # Noise/fault generators are seeded so a device's sequence of measurements is reproducible.
        self._noise_gen = torch.Generator().manual_seed(config.seed + 1)
        self._fault_rng = np.random.default_rng(config.seed + 2)
        self._drift_gen = torch.Generator().manual_seed(config.seed + 3)
        self._walks: dict[str, RandomWalk] = {}
        self._t0 = time.monotonic()
        self.calls = 0
        # Free-form facts about this device (e.g. a fitted model's held-out error); never I/O.
        self.info: dict = {}

    # -- protocol ---------------------------------------------------------------------------------
    @property
    def spec(self) -> SystemSpec:
        raise NotImplementedError

    def connect(self) -> None:
        """Simulators have nothing to connect to."""

    def close(self) -> None:
        """Simulators hold no resources."""

    def ideal_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def forward(self, x, theta) -> torch.Tensor:
        """Measure y[B, n_outputs] for x[B, n_inputs] and theta[n_params] or theta[B, n_params].

        The local path (a simulator called directly): the request is checked against the envelope
        here. The device actor checks each request once on arrival and calls `forward_checked`."""
        x_np, theta_np = check_request(self.spec, x, theta)
        return self.forward_checked(torch.from_numpy(np.array(x_np, copy=True)),
                                    torch.from_numpy(np.array(theta_np, copy=True)))

    def forward_checked(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """`forward` for a request already checked against `spec` (float32 tensors of the right
        shapes, inside the envelope, that this call may keep): not checked again."""
        theta = expand_rows(theta, x.shape[0])  # _measure takes one theta row per sample
        start = time.monotonic()
        self.calls += 1
        if self.config.fault_rate and self._fault_rng.random() < self.config.fault_rate:
            raise DeviceError(f"{self.spec.name}: simulated device fault on call {self.calls}")
        with torch.no_grad():
            y = self._measure(x, theta)
        self._sleep_latency(x.shape[0], start)
        return y.to(torch.float32)

    # -- for subclasses ---------------------------------------------------------------------------
    def _measure(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self._noise_gen)

    def drift_clock(self) -> float:
        """Elapsed drift time: device calls so far, or seconds since construction."""
        if self.config.drift_clock == "time":
            return time.monotonic() - self._t0
        return float(self.calls)

    def drift_walk(self, name: str, shape: tuple[int, ...], step: float) -> torch.Tensor | None:
        """The current state of the named drift random walk (advanced to the drift clock), with
        `step` the nominal spread per unit of clock, scaled by `config.drift`. None when drift is off
        (so no random numbers are drawn and the device is exactly the drift-free one)."""
        scale = self.config.drift * step
        if scale <= 0:
            return None
        walk = self._walks.get(name)
        if walk is None:
            walk = self._walks[name] = RandomWalk(shape, scale, self._drift_gen)
        return walk.advance(self.drift_clock())

    def adc(self, y: torch.Tensor, full_scale: tuple[float, float]) -> torch.Tensor:
        """Clip to the ADC's full scale and quantise to `adc_bits` (saturation is real)."""
        lo, hi = full_scale
        y = y.clamp(lo, hi)
        bits = self.config.adc_bits
        if bits is None:
            return y
        step = (hi - lo) / (2**bits - 1)
        return lo + torch.round((y - lo) / step) * step

    def _spec_latency(self) -> float:
        """Typical seconds of a full call (informative, for SystemSpec.latency_s)."""
        return self.config.latency_call_s + self.config.latency_row_s * self.config.max_rows

    def _sleep_latency(self, rows: int, start: float) -> None:
        budget = self.config.latency_call_s + rows * self.config.latency_row_s
        if budget > 0:
            remaining = budget - (time.monotonic() - start)
            if remaining > 0:
                time.sleep(remaining)
