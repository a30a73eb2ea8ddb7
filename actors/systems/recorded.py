"""`recorded`: a device replayed from measured data (PHYSICS.md section 6).

A lab brings measured (controls, response) rows; physfarm fits a model to them, reports its error on
a held-out split and serves forward passes from it, adding Gaussian noise with the spread (a robust std per
output) of the held-out residuals, so the replay is as noisy as the model is wrong plus the device
was noisy. It keeps a group working when the hardware is away.

The files (one table, or controls and responses as two files; CSV, NPZ, Parquet) are read and checked
by `recorded_data`; the model is fitted, and cached on disk for every process, by `recorded_fit`.
Reading and fitting are I/O and work, so they happen on `connect()` (which the pool calls when it
starts the device, so no fit is ever counted as device time), never in the constructor. `inspect()`
reads and checks the files without fitting (what `physfarm sweep --check` prints). `info` holds the
held-out errors once fitted. Mismatch does not apply (the fit is the only model there is); drift and
ADC are not simulated.
"""
from __future__ import annotations

import copy
import threading

import torch

from ..spec import SystemSpec
from ..tables import TableError
from .base import SimulatedSystem
from .configs import RecordedConfig
from .recorded_data import read_measurements
from .recorded_fit import RecordedModel, fitted, new_model


class Recorded(SimulatedSystem):
    config_class = RecordedConfig

    def __init__(self, config: RecordedConfig | dict | None = None, **overrides):
        super().__init__(config, **overrides)
        self._model: RecordedModel | None = None
        self._noise_std: torch.Tensor | None = None
        self._lock = threading.Lock()
        self.info = {"fitted": False, "files": [p for p in (self.config.path, self.config.controls_path,
                                                               self.config.responses_path) if p]}

    @property
    def spec(self) -> SystemSpec:
        cfg = self.config
        return SystemSpec(
            name=cfg.name, n_inputs=cfg.n_inputs, n_params=cfg.n_params, n_outputs=cfg.n_outputs,
            input_range=cfg.input_range, param_range=cfg.param_range, max_rows=cfg.max_rows,
            latency_s=self._spec_latency(),
        )

    def connect(self) -> None:
        """Read the data file(s) and fit the model (or load the cached fit)."""
        self._ensure_fitted()

    def inspect(self) -> dict:
        """Read and check the data file(s) without fitting: {"summary": ..., "notes": [...]}.
        Raises TableError (a ValueError) naming the file and line for anything malformed."""
        m = read_measurements(self.config)
        return {"summary": m.summary(), "notes": m.notes()}

    def ideal_model(self) -> torch.nn.Module:
        """The fitted model itself (a copy, its weights trainable), without the replay noise."""
        model = copy.deepcopy(self._ensure_fitted())
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def metadata(self) -> dict:
        """Held-out errors and fit facts (fits first if needed)."""
        self._ensure_fitted()
        return dict(self.info)

    def dead_outputs(self) -> list[int]:
        """Outputs that never vary in the measurements (0-based)."""
        return list(self.metadata()["data"]["dead_outputs"])

    def _measure(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        model = self._ensure_fitted()
        y = model(x, theta)
        if self.config.noise > 0:
            y = y + self.config.noise * self._noise_std * self._randn(*y.shape)
        return y

    def _ensure_fitted(self) -> RecordedModel:
        with self._lock:
            if self._model is None:
                result = fitted(self.config)
                model = new_model(self.config, result.state)
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(False)  # the device's copy never trains; ideal_model() re-enables grads
                self._noise_std = result.noise_std
                self.info = dict(result.info)
                self._model = model
            return self._model


__all__ = ["Recorded", "RecordedConfig", "RecordedModel", "TableError"]
