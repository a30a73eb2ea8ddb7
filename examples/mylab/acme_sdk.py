"""A stand-in for a vendor SDK ("Acme LED spectrometer"), so the example runs without hardware.

It mimics what such SDKs look like: an opaque handle, imperative setters, one blocking acquisition
per call that returns a list of counts, and its own exception type. Its "hardware" is simulated:
an array of LEDs (power droops at high current) shines through a cell holding a mix of dyes
(Beer-Lambert absorption) onto a grating spectrometer with `n_bins` pixels. Everything a real device
has and a model lacks is here: LED centre wavelengths off by a few nm (`mismatch`), shot and read
noise (`noise`), LED ageing (`drift`), exposure and overhead times (really slept), and USB timeouts
(`fault_rate`). A real lab deletes this file and imports the vendor's package instead.
"""
from __future__ import annotations

import time

import numpy as np

WAVELENGTHS_NM = (400.0, 700.0)


class AcmeError(RuntimeError):
    """What the vendor SDK raises (e.g. a USB timeout)."""


def led_centres(n_leds: int) -> np.ndarray:
    """Nominal LED centre wavelengths (nm), spread over the band (datasheet values)."""
    lo, hi = WAVELENGTHS_NM
    return lo + (hi - lo) * (np.arange(n_leds) + 0.5) / n_leds


def dye_peaks(n_dyes: int) -> np.ndarray:
    lo, hi = WAVELENGTHS_NM
    return lo + (hi - lo) * (np.arange(n_dyes) + 0.25) / n_dyes


class AcmeSpectrometer:
    """Opaque handle returned by `open_device` (the vendor's API, simulated)."""

    LED_WIDTH_NM = 25.0  # Gaussian 1/e half-width of an LED's spectrum
    DYE_WIDTH_NM = 40.0  # width of a dye's absorption band
    DROOP = 0.5  # LED power P = I / (1 + DROOP I), I in units of the maximum current
    GAIN = 1.0  # counts per unit of detected power (in thousands)

    def __init__(self, serial: str, n_leds: int, n_dyes: int, n_bins: int, *, seed: int = 0,
                 mismatch: float = 1.0, noise: float = 1.0, drift: float = 0.0,
                 fault_rate: float = 0.0, overhead_s: float = 0.0, exposure_s: float = 0.0):
        rng = np.random.default_rng(seed)
        self.serial = serial
        self.n_leds, self.n_dyes, self.n_bins = n_leds, n_dyes, n_bins
        self.centres = led_centres(n_leds) + 3.0 * mismatch * rng.standard_normal(n_leds)  # nm
        self.noise, self.drift, self.fault_rate = noise, drift, fault_rate
        self.overhead_s, self.exposure_s = overhead_s, exposure_s
        self._rng = np.random.default_rng(seed + 1)
        self._currents = np.zeros(n_leds)
        self._mix = np.zeros(n_dyes)
        self._acquisitions = 0
        self._open = True

    def set_led_currents(self, currents) -> None:
        c = np.asarray(currents, dtype=np.float64)
        if c.shape != (self.n_leds,) or c.min() < 0 or c.max() > 1:
            raise AcmeError(f"LED currents must be {self.n_leds} values in [0, 1]")
        self._currents = c

    def set_dye_mix(self, mix) -> None:
        m = np.asarray(mix, dtype=np.float64)
        if m.shape != (self.n_dyes,) or m.min() < 0 or m.max() > 1:
            raise AcmeError(f"dye mix must be {self.n_dyes} values in [0, 1]")
        self._mix = m

    def begin(self) -> None:
        """Start a measurement series (the instrument's fixed per-call overhead: shutter, sync)."""
        if self.overhead_s:
            time.sleep(self.overhead_s)

    def acquire(self) -> list[float]:
        """One exposure: the spectrum in thousands of counts per pixel."""
        if not self._open:
            raise AcmeError("device is closed")
        if self.fault_rate and self._rng.random() < self.fault_rate:
            raise AcmeError(f"{self.serial}: USB timeout during acquisition")
        if self.exposure_s:
            time.sleep(self.exposure_s)
        self._acquisitions += 1
        ageing = 1.0 - 1e-3 * self.drift * self._acquisitions  # LEDs dim with use
        lam = pixel_wavelengths(self.n_bins)
        power = ageing * self._currents / (1 + self.DROOP * self._currents)  # [n_leds]
        led = np.exp(-((lam[None] - self.centres[:, None]) / self.LED_WIDTH_NM) ** 2)  # [n_leds, n_bins]
        dye = np.exp(-((lam[None] - dye_peaks(self.n_dyes)[:, None]) / self.DYE_WIDTH_NM) ** 2)
        emitted = power @ led
        absorb = self._mix @ dye
        signal = self.GAIN * emitted * np.exp(-2.0 * absorb)
        if self.noise:
            shot = 0.01 * np.sqrt(np.maximum(signal, 0.0))  # photon shot noise
            signal = signal + self.noise * (shot + 0.002) * self._rng.standard_normal(self.n_bins)
        return signal.tolist()

    def close(self) -> None:
        self._open = False


def pixel_wavelengths(n_bins: int) -> np.ndarray:
    lo, hi = WAVELENGTHS_NM
    return lo + (hi - lo) * (np.arange(n_bins) + 0.5) / n_bins


def open_device(serial: str, **kwargs) -> AcmeSpectrometer:
    """The SDK's entry point (a real one would find the USB device by serial number)."""
    return AcmeSpectrometer(serial, **kwargs)
