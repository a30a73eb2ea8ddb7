"""`Spectrometer`: a lab's LED/dye-cell spectrometer wrapped as a physfarm PhysicalSystem.

Use it with the system kind "mylab.devices:Spectrometer" (examples/ on PYTHONPATH). Data inputs x
drive the LED currents, trainable theta set the dye mix in the cell, the outputs are the spectrum.
Everything a wrapper needs is here: a pydantic config class, `spec` (the hard safe envelope), an
I/O-free constructor, `connect`/`close` for the vendor handle, `forward` (one acquisition per row,
vendor errors turned into DeviceError) and `ideal_model` (the nominal physics in torch).
"""
from __future__ import annotations

import threading
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from actors.envelope import check_request
from actors.errors import DeviceError
from actors.spec import SystemSpec

from . import acme_sdk


class SpectrometerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["mylab.devices:Spectrometer"] = "mylab.devices:Spectrometer"
    serial: str = "ACME-0001"
    n_leds: int = Field(default=8, ge=1)  # = n_inputs
    n_dyes: int = Field(default=4, ge=0)  # = n_params
    n_bins: int = Field(default=16, ge=10)  # = n_outputs
    max_rows: int = Field(default=64, ge=1)
    # Only the simulated SDK uses these (a real instrument has its own mismatch, noise and timing):
    seed: int = 0
    mismatch: float = Field(default=1.0, ge=0.0)
    noise: float = Field(default=1.0, ge=0.0)
    drift: float = Field(default=0.0, ge=0.0)
    fault_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    latency_call_s: float = Field(default=0.0, ge=0.0)  # shutter/sync overhead per call
    latency_row_s: float = Field(default=0.0, ge=0.0)  # exposure per row


class SpectrometerModel(torch.nn.Module):
    """Nominal physics from the datasheets: LED droop, Gaussian LED and dye spectra, Beer-Lambert."""

    def __init__(self, cfg: SpectrometerConfig):
        super().__init__()
        lam = torch.tensor(acme_sdk.pixel_wavelengths(cfg.n_bins))
        leds = torch.tensor(acme_sdk.led_centres(cfg.n_leds))
        dyes = torch.tensor(acme_sdk.dye_peaks(cfg.n_dyes))
        S = acme_sdk.AcmeSpectrometer
        self.register_buffer("emit", torch.exp(-((lam[None] - leds[:, None]) / S.LED_WIDTH_NM) ** 2))
        self.register_buffer("absorb", torch.exp(-((lam[None] - dyes[:, None]) / S.DYE_WIDTH_NM) ** 2))
        self.droop, self.gain = S.DROOP, S.GAIN

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        theta = theta.expand(x.shape[0], -1) if theta.ndim == 1 else theta
        x, theta = x.double(), theta.double()  # the SDK computes in float64 too
        power = x / (1 + self.droop * x)  # [B, n_leds]
        spectrum = self.gain * (power @ self.emit) * torch.exp(-2.0 * (theta @ self.absorb))
        return spectrum.float()  # [B, n_bins]


class Spectrometer:
    config_class = SpectrometerConfig

    def __init__(self, config: SpectrometerConfig | dict | None = None, **overrides):
        if not isinstance(config, SpectrometerConfig):
            config = SpectrometerConfig.model_validate({**(config or {}), **overrides})
        self.config = config  # no I/O here: the handle is opened by connect()
        self._dev: acme_sdk.AcmeSpectrometer | None = None
        self._lock = threading.Lock()

    @property
    def spec(self) -> SystemSpec:
        c = self.config
        return SystemSpec(name="acme-spectrometer", n_inputs=c.n_leds, n_params=c.n_dyes,
                          n_outputs=c.n_bins, input_range=(0.0, 1.0), param_range=(0.0, 1.0),
                          max_rows=c.max_rows, latency_s=c.latency_call_s + c.max_rows * c.latency_row_s)

    def connect(self) -> None:
        if self._dev is None:
            c = self.config
            try:
                self._dev = acme_sdk.open_device(
                    c.serial, n_leds=c.n_leds, n_dyes=c.n_dyes, n_bins=c.n_bins, seed=c.seed,
                    mismatch=c.mismatch, noise=c.noise, drift=c.drift, fault_rate=c.fault_rate,
                    overhead_s=c.latency_call_s, exposure_s=c.latency_row_s)
            except acme_sdk.AcmeError as exc:
                raise DeviceError(f"spectrometer {c.serial}: cannot open: {exc}") from None

    def close(self) -> None:
        if self._dev is not None:
            self._dev.close()
            self._dev = None

    def forward(self, x, theta) -> torch.Tensor:
        x, theta = check_request(self.spec, x, theta)  # refuse anything outside the envelope first
        theta = np.broadcast_to(theta, (x.shape[0], theta.shape[-1]))
        with self._lock:  # one acquisition at a time on the hardware
            self.connect()
            try:
                self._dev.begin()
                rows = []
                for xi, ti in zip(x, theta):  # the hardware measures one row at a time
                    self._dev.set_dye_mix(ti)
                    self._dev.set_led_currents(xi)
                    rows.append(self._dev.acquire())
            except acme_sdk.AcmeError as exc:
                raise DeviceError(f"spectrometer {self.config.serial}: {exc}") from None
        return torch.tensor(np.array(rows), dtype=torch.float32)

    def ideal_model(self) -> torch.nn.Module:
        return SpectrometerModel(self.config)
