"""`cavity`: a wave-chaotic cavity with a programmable surface (PhyLL's microwave/optical PNN), PHYSICS.md 5.

Controls u = concat(x, theta) in [0, 1] set the phases of the M = n_inputs + n_params surface elements
(default 64 + 0: PhyLL trains only the digital layers), phi_k = pi u_k, optionally quantised to
`phase_bits` bits (1 or 2 for the microwave metasurface: u -> round(u (2^b - 1)) / (2^b - 1)).
  field     E = T exp(i phi) + E0,   T: [n_outputs x M] complex Gaussian, variance 1/M per entry (the
            cavity's fingerprint, from `structure_seed`), E0: [n_outputs] static background from the
            walls, complex Gaussian with variance `background` (default 0.5)
  detected  y = |E|^2 (the detector is the nonlinearity); mean level 1 + background.
Device vs ideal model (mismatch=1): the model's T is the device's plus a 5 % complex Gaussian error
(std 0.05 / sqrt(M) per entry, seeded by `seed`). Noise (noise=1): detector noise 1 % of the unit
level (std 0.01) plus shot noise (std 0.01 sqrt(y): 10^4 photons per unit of intensity). Drift: every
element of the device's T turns its phase by a seeded random walk of `drift_phase` rad per sqrt(call
or second) at drift=1 (temperature changes the optical path of each ray). With adc_bits the detector
is digitised on [0, full_scale] in device and model alike. Phase quantisation is part of the
hardware, so the model quantises too (straight-through gradient). Cost: one [B, M] x [M, n_out]
complex product.
"""
from __future__ import annotations

import math

import torch

from ..spec import SystemSpec
from .configs import CavityConfig
from .base import SimulatedSystem, quantise




def _complex_gaussian(shape, std: float, gen: torch.Generator) -> torch.Tensor:
    """Circular complex Gaussian with E|z|^2 = std^2."""
    re = torch.randn(*shape, generator=gen, dtype=torch.float64)
    im = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return torch.complex(re, im) * (std / math.sqrt(2))


class CavityModel(torch.nn.Module):
    """Differentiable cavity physics: forward(x[B, n_in], theta[B, n_params] or [n_params]) -> y[B, n_out]."""

    def __init__(self, t: torch.Tensor, e0: torch.Tensor, phase_bits: int | None,
                 full_scale: float, adc_bits: int | None):
        super().__init__()
        self.phase_bits, self.adc_bits, self.full_scale = phase_bits, adc_bits, (0.0, float(full_scale))
        self.set_transmission(t)
        self.register_buffer("e0", e0.to(torch.complex64))  # [n_out]

    def set_transmission(self, t: torch.Tensor) -> None:
        self.register_buffer("t_t", t.T.to(torch.complex64).contiguous())  # [M, n_out]

    def intensity(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if theta.ndim == 1:
            theta = theta.expand(x.shape[0], -1)
        u = torch.cat([x, theta], dim=1)  # [B, M] in [0, 1]
        if self.phase_bits is not None:  # a b-bit surface: the hardware only has these phase states
            levels = 2**self.phase_bits - 1
            u = u + (torch.round(u * levels) / levels - u).detach()  # straight-through
        phase = math.pi * u
        field = torch.complex(torch.cos(phase), torch.sin(phase)) @ self.t_t + self.e0  # [B, n_out]
        return field.real**2 + field.imag**2

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return quantise(self.intensity(x, theta), self.full_scale, self.adc_bits)


class Cavity(SimulatedSystem):
    config_class = CavityConfig

    def __init__(self, config: CavityConfig | dict | None = None, **overrides):
        super().__init__(config, **overrides)
        cfg = self.config
        m = cfg.n_inputs + cfg.n_params
        gs = torch.Generator().manual_seed(cfg.structure_seed)
        self._t = _complex_gaussian((cfg.n_outputs, m), 1.0 / math.sqrt(m), gs)  # the device's T
        e0 = _complex_gaussian((cfg.n_outputs,), math.sqrt(cfg.background), gs)
        gm = torch.Generator().manual_seed(cfg.seed)  # the model's calibration error
        self._t_model = self._t + _complex_gaussian(self._t.shape, cfg.t_error * cfg.mismatch / math.sqrt(m), gm)
        self._e0 = e0
        self._device_model = CavityModel(self._t, e0, cfg.phase_bits, cfg.full_scale, cfg.adc_bits)

    @property
    def spec(self) -> SystemSpec:
        cfg = self.config
        return SystemSpec(
            name="cavity", n_inputs=cfg.n_inputs, n_params=cfg.n_params, n_outputs=cfg.n_outputs,
            input_range=(0.0, 1.0), param_range=(0.0, 1.0), max_rows=cfg.max_rows,
            latency_s=self._spec_latency(),
        )

    def ideal_model(self) -> torch.nn.Module:
        cfg = self.config
        return CavityModel(self._t_model, self._e0, cfg.phase_bits, cfg.full_scale, cfg.adc_bits)

    def _measure(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        cfg, model = self.config, self._device_model
        walk = self.drift_walk("phase", tuple(self._t.shape), cfg.drift_phase)
        if walk is not None:  # each ray's optical path drifts: a phase walk per element of T
            model.set_transmission(self._t * torch.exp(1j * walk.to(torch.float64)))
        y = model.intensity(x, theta)
        if cfg.noise > 0:
            sigma = cfg.noise * torch.sqrt(cfg.detector_noise**2 + cfg.shot_noise**2 * y.clamp(min=0))
            y = y + sigma * self._randn(*y.shape)
        return quantise(y, model.full_scale, cfg.adc_bits, straight_through=False)


__all__ = ["Cavity", "CavityConfig", "CavityModel"]
