"""`oscillators`: N coupled nonlinear oscillators (PAT's worked example), PHYSICS.md section 1.

dq_i/dt = p_i
dp_i/dt = -sin((1 + eta) q_i) + sum_j S_ij (sin q_j - sin q_i) + e_i
x -> q(0) (p(0) = 0); theta = [C (N*N, row-major), e (N)]; S = (C + C^T)/2 + coupling error;
output q(T), T = steps * dt (default 5 RK4 steps of 0.1), first n_outputs oscillators.
The device has eta = 0.1 and a seeded symmetric coupling error (std 0.05); the ideal model has
neither. Noise: Gaussian (std 0.02) on q(0).
Drift (our addition; PHYSICS.md gives none for this system): the coupling error performs a seeded
symmetric random walk, std `drift_coupling` per sqrt(clock unit) at drift=1 (a slowly wandering
coupling, e.g. thermal). drift=0 (the default) leaves the device exactly as without drift.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..spec import SystemSpec
from .base import SimConfig, SimulatedSystem


class OscillatorsConfig(SimConfig):
    kind: Literal["oscillators"] = "oscillators"
    n: int = Field(default=64, ge=1, le=1024, description="number of oscillators (= n_inputs)")
    n_outputs: int | None = Field(default=None, ge=1, description="oscillators read out (default n)")
    dt: float = Field(default=0.1, gt=0.0, description="RK4 step (dimensionless time)")
    steps: int = Field(default=5, ge=1, description="RK4 steps; T = steps * dt")
    eta: float = Field(default=0.1, description="device's nonlinearity error at mismatch=1")
    coupling_error: float = Field(default=0.05, ge=0.0, description="std of the coupling error at mismatch=1")
    input_noise: float = Field(default=0.02, ge=0.0, description="std of the noise on q(0) at noise=1")
    drift_coupling: float = Field(default=0.002, ge=0.0,
                                  description="coupling random-walk std per sqrt(call or second) at drift=1")


class OscillatorsModel(torch.nn.Module):
    """Differentiable oscillator physics: forward(x[B, N], theta[B, N*N+N] or [N*N+N]) -> q(T)[B, n_out]."""

    def __init__(self, n: int, n_outputs: int, dt: float, steps: int, eta: float = 0.0,
                 coupling_error: torch.Tensor | None = None):
        super().__init__()
        self.n, self.n_outputs, self.dt, self.steps = n, n_outputs, dt, steps
        self.register_buffer("eta", torch.tensor(float(eta)))
        err = torch.zeros(n, n) if coupling_error is None else coupling_error
        self.register_buffer("coupling_error", err.to(torch.float32))

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        n, rows = self.n, x.shape[0]
        if theta.ndim == 2 and theta.stride(0) == 0:
            theta = theta[0]  # one theta expanded over the rows (a view): take the shared vector
        if theta.ndim == 1:
            # One theta for every row (the common case: a PNN layer's parameters): one coupling
            # matrix S[N, N] shared by the batch, so the coupling is a single [B, N] x [N, N] matmul
            # instead of B matrix-vector products over a materialised [B, N, N] copy of S.
            c = theta[: n * n].reshape(n, n)
            e = theta[n * n :]  # [N], broadcast over rows
            s = 0.5 * (c + c.T) + self.coupling_error  # [N, N], symmetric
            s_rowsum = s.sum(dim=1)  # [N]

            def couple(sq):  # sum_j S_ij sin q_j for every row: [B, N] @ S^T
                return sq @ s.T
        else:
            c = theta[:, : n * n].reshape(rows, n, n)
            e = theta[:, n * n :]
            s = 0.5 * (c + c.transpose(1, 2)) + self.coupling_error  # [B, N, N], symmetric
            s_rowsum = s.sum(dim=2)  # [B, N]

            def couple(sq):  # per-row S: B matrix-vector products
                return torch.bmm(s, sq.unsqueeze(2)).squeeze(2)

        def accel(q):
            sq = torch.sin(q)
            coupling = couple(sq) - sq * s_rowsum
            return -torch.sin((1.0 + self.eta) * q) + coupling + e

        q, p, dt = x, torch.zeros_like(x), self.dt
        for _ in range(self.steps):  # classic RK4 on (q, p)
            k1q, k1p = p, accel(q)
            k2q, k2p = p + 0.5 * dt * k1p, accel(q + 0.5 * dt * k1q)
            k3q, k3p = p + 0.5 * dt * k2p, accel(q + 0.5 * dt * k2q)
            k4q, k4p = p + dt * k3p, accel(q + dt * k3q)
            q = q + dt / 6.0 * (k1q + 2 * k2q + 2 * k3q + k4q)
            p = p + dt / 6.0 * (k1p + 2 * k2p + 2 * k3p + k4p)
        return q[:, : self.n_outputs]


class Oscillators(SimulatedSystem):
    config_class = OscillatorsConfig

    def __init__(self, config: OscillatorsConfig | dict | None = None, **overrides):
        super().__init__(config, **overrides)
        cfg = self.config
        n = cfg.n
        # The device's fixed fabrication error: symmetric, seeded, independent of the noise stream.
        gen = torch.Generator().manual_seed(cfg.seed)
        a = torch.randn(n, n, generator=gen) * cfg.coupling_error * cfg.mismatch
        self._coupling_error = (a + a.T) / 2 ** 0.5
        self._device_model = OscillatorsModel(
            n, self._n_out, cfg.dt, cfg.steps, eta=cfg.eta * cfg.mismatch,
            coupling_error=self._coupling_error,
        )

    @property
    def _n_out(self) -> int:
        return self.config.n_outputs or self.config.n

    @property
    def spec(self) -> SystemSpec:
        n = self.config.n
        return SystemSpec(
            name="oscillators", n_inputs=n, n_params=n * n + n, n_outputs=self._n_out,
            input_range=(-1.0, 1.0), param_range=(-2.0, 2.0), max_rows=self.config.max_rows,
            latency_s=self.config.latency_call_s,
        )

    def ideal_model(self) -> torch.nn.Module:
        cfg = self.config
        return OscillatorsModel(cfg.n, self._n_out, cfg.dt, cfg.steps)

    def _measure(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        n = self.config.n
        walk = self.drift_walk("coupling", (n, n), self.config.drift_coupling)
        if walk is not None:  # symmetric, like the coupling it perturbs
            self._device_model.coupling_error = self._coupling_error + (walk + walk.T) / 2 ** 0.5
        sigma = self.config.input_noise * self.config.noise
        q0 = x + sigma * self._randn(*x.shape) if sigma > 0 else x
        y = self._device_model(q0, theta)
        return self.adc(y, (-4.0, 4.0)) if self.config.adc_bits else y
