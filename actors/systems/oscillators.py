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


import torch

from ..spec import SystemSpec
from .configs import OscillatorsConfig
from .base import SimulatedSystem




class OscillatorsModel(torch.nn.Module):
    """Differentiable oscillator physics: forward(x[B, N], theta[B, N*N+N] or [N*N+N]) -> q(T)[B, n_out]."""

    def __init__(self, n: int, n_outputs: int, dt: float, steps: int, eta: float = 0.0,
                 coupling_error: torch.Tensor | None = None, eta_in_coupling: bool = False):
        super().__init__()
        self.n, self.n_outputs, self.dt, self.steps = n, n_outputs, dt, steps
        self.eta_in_coupling = eta_in_coupling
        self.register_buffer("eta", torch.tensor(float(eta)))
        err = torch.zeros(n, n) if coupling_error is None else coupling_error
        self.register_buffer("coupling_error", err.to(torch.float32))

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        n, rows = self.n, x.shape[0]
        if theta.ndim == 2 and theta.stride(0) == 0:
            theta = theta[0]  # one theta expanded over the rows (a view): take the shared vector
        if (theta.ndim == 1 and torch.is_grad_enabled() and (x.requires_grad or theta.requires_grad)
                and not (self.eta.requires_grad or self.coupling_error.requires_grad)):
            # Training through the model (PAT's backward, in-silico training): a hand-written adjoint
            # of the RK4 integration, about twice as fast as autograd's tape for large N (it folds the
            # 4 * steps coupling-matrix gradients into one matrix product). Calibrated twins whose
            # eta or coupling error are fitted parameters take autograd's path below.
            return _OscillatorsRK4.apply(x, theta, self.eta, self.coupling_error, n, self.dt, self.steps,
                                         self.eta_in_coupling)[:, : self.n_outputs]
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
            sq = torch.sin((1.0 + self.eta) * q) if self.eta_in_coupling else torch.sin(q)
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


class _OscillatorsRK4(torch.autograd.Function):
    """q(T)[B, N] of the oscillators for one shared theta, with the exact adjoint of the discrete RK4
    integration as its backward (the same numbers autograd gives, up to float rounding).

    Per stage the acceleration is A(q) = -sin(a q) + sin(b q) S - sin(b q) * r + e with a = 1 + eta,
    b = a where eta enters the coupling too (else 1), S = (C + C^T)/2 + coupling error (symmetric,
    [N, N]) and r = S's row sums. The forward keeps each
    stage's input q (4 * steps tensors of [B, N]); the backward walks the stages in reverse, and the
    gradient of S, sum over stages of g^T sin(q), is one [N, 4*steps*B] x [4*steps*B, N] product.
    """

    @staticmethod
    def forward(ctx, x, theta, eta, coupling_error, n: int, dt: float, steps: int, eta_in_coupling: bool):
        a = 1.0 + eta
        b = a if eta_in_coupling else torch.ones_like(a)
        c = theta[: n * n].reshape(n, n)
        e = theta[n * n :]
        s = 0.5 * (c + c.T) + coupling_error
        r = s.sum(dim=1)

        def accel(q):  # the same operations, in the same order, as OscillatorsModel's no-grad path
            sq = torch.sin(a * q) if eta_in_coupling else torch.sin(q)
            coupling = sq @ s.T - sq * r
            return -torch.sin(a * q) + coupling + e

        stages = []  # the q each accel() was evaluated at, in order
        q, p = x, torch.zeros_like(x)
        for _ in range(steps):
            q1 = q
            k1q, k1p = p, accel(q1)
            q2 = q + 0.5 * dt * k1q
            k2q, k2p = p + 0.5 * dt * k1p, accel(q2)
            q3 = q + 0.5 * dt * k2q
            k3q, k3p = p + 0.5 * dt * k2p, accel(q3)
            q4 = q + dt * k3q
            k4q, k4p = p + dt * k3p, accel(q4)
            stages += [q1, q2, q3, q4]
            q = q + dt / 6.0 * (k1q + 2 * k2q + 2 * k3q + k4q)
            p = p + dt / 6.0 * (k1p + 2 * k2p + 2 * k3p + k4p)
        ctx.save_for_backward(torch.stack(stages), s, r, a, b)
        ctx.consts = (n, dt, steps)
        return q

    @staticmethod
    def backward(ctx, grad_q):
        stages, s, r, a, b = ctx.saved_tensors
        n, dt, steps = ctx.consts
        g_stage = torch.empty_like(stages)  # dL/dA at each stage, for the parameter gradients

        def accel_vjp(i: int, g):  # dL/dq of A(stages[i]) given dL/dA = g; records g
            q = stages[i]
            g_stage[i] = g
            return -a * torch.cos(a * q) * g + b * torch.cos(b * q) * (g @ s - g * r)

        gq, gp = grad_q.contiguous(), torch.zeros_like(grad_q)
        for step in reversed(range(steps)):
            i = 4 * step
            # q' = q + dt/6 (k1q + 2 k2q + 2 k3q + k4q), p' likewise with the k*p
            gk1q, gk2q, gk3q, gk4q = (dt / 6) * gq, (dt / 3) * gq, (dt / 3) * gq, (dt / 6) * gq
            gk1p, gk2p, gk3p, gk4p = (dt / 6) * gp, (dt / 3) * gp, (dt / 3) * gp, (dt / 6) * gp
            g_q, g_p = gq, gp
            g4 = accel_vjp(i + 3, gk4p)           # k4p = A(q4), q4 = q + dt k3q
            g_q = g_q + g4
            gk3q = gk3q + dt * g4
            g_p = g_p + gk4q                      # k4q = p + dt k3p
            gk3p = gk3p + dt * gk4q
            g3 = accel_vjp(i + 2, gk3p)           # k3p = A(q3), q3 = q + dt/2 k2q
            g_q = g_q + g3
            gk2q = gk2q + 0.5 * dt * g3
            g_p = g_p + gk3q                      # k3q = p + dt/2 k2p
            gk2p = gk2p + 0.5 * dt * gk3q
            g2 = accel_vjp(i + 1, gk2p)           # k2p = A(q2), q2 = q + dt/2 k1q
            g_q = g_q + g2
            gk1q = gk1q + 0.5 * dt * g2
            g_p = g_p + gk2q                      # k2q = p + dt/2 k1p
            gk1p = gk1p + 0.5 * dt * gk2q
            g_q = g_q + accel_vjp(i, gk1p)        # k1p = A(q)
            g_p = g_p + gk1q                      # k1q = p
            gq, gp = g_q, g_p
        grad_x = gq if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            sq = torch.sin(b * stages).reshape(-1, n)  # [4*steps*B, N]
            g = g_stage.reshape(-1, n)
            g_s = g.T @ sq  # d/dS of sum_stages g (sin q S^T): [N, N]
            g_s = g_s - (g * sq).sum(dim=0)[:, None]  # through r_i = sum_j S_ij
            g_c = 0.5 * (g_s + g_s.T)
            grad_theta = torch.cat([g_c.reshape(-1), g.sum(dim=0)])
        return grad_x, grad_theta, None, None, None, None, None, None


class Oscillators(SimulatedSystem):
    config_class = OscillatorsConfig
    # A theta row per sample builds a coupling matrix per row: a call that merges several trials'
    # requests is measured one theta at a time instead (actors.theta_rows.splits_by_theta).
    splits_by_theta = True

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
            coupling_error=self._coupling_error, eta_in_coupling=cfg.eta_in_coupling,
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
