"""`circuit`: a nonlinear analogue circuit (PAT's electronic PNN), PHYSICS.md section 4.

A series RLC driven by the time-multiplexed controls, with a diode across the capacitor:
    L di/dt = V_in(t) - R i - v,        C dv/dt = i - I_s (exp(v / (n V_T)) - 1)
Controls u = concat(x, theta) in [-1, 1] (`slot_order="interleave"` spreads theta between the inputs),
each held for one slot of `slot_s` (default 1 us) as V_in = V_max u, V_max = 0.8 V.
Components: C = 1 nF, L and R chosen so that f0 = 1/(2 pi sqrt(LC)) is half the slot rate (500 kHz:
L = 101 uH) and Q = sqrt(L/C)/R = 3 (R = 106 Ohm): the circuit remembers about two slots, so
neighbouring controls mix. Diode: I_s = 1e-12 A at 300 K, n = 1.8, V_T = kT/q (25.9 mV).
Output j: v sampled at the end of the j-th of n_outputs equal windows of the whole record (volts),
then Johnson noise (1 mV at noise=1) and the 12-bit ADC on [-2, 2] V (in device and model alike).

Integration (the same code is the device and the ideal model): Strang splitting with step h =
slot / substeps (default 0.25 us); the state is (Z0 i, v) with Z0 = sqrt(L/C), both volts of order one
in float32. The two parts are each solved *exactly* over a step:
  L: the linear RLC under the held input (3x3 augmented matrix exponential, computed once);
  D: the diode alone, C dv/dt = -I_s (exp(v/nV_T) - 1), whose closed form is
     v(t) = v - nV_T log1p(kappa (exp(v/nV_T) - 1)), kappa = 1 - exp(-I_s t / (C nV_T)):
     stable however stiff the diode (its time constant C/g_d falls to ns at mA). The exponent is
     capped at 80 (v = 3.7 V, far above where the diode clamps the node, ~0.9 V) only to keep float32
     finite.
Each output is taken at its exact time (a fractional step reaches it when it falls inside a step).
Against a converged stiff solver (scipy Radau, rtol 1e-9) on random controls, 4 substeps are within
0.02-0.03 V rms (0.1 V worst case) of the true node voltage, 8 within 0.01 V rms; the splitting
error sits where the diode switches on. Cost: (n_slots * substeps) steps of ~10 [B]-sized ops, about
15-30 ms for 256 rows on one core.

Device vs ideal model (mismatch=1): R, L and C each off by up to 5 % (seeded, uniform). Drift: a
seeded temperature random walk (`drift_temperature` K per sqrt(call or second) at drift=1) moves
V_T = k T / q and I_s (which doubles per 10 K) in the device.
"""
from __future__ import annotations

import math

import torch

from ..spec import SystemSpec
from .configs import CircuitConfig
from .base import SimulatedSystem, quantise
from .slots import perm_buffer, slot_controls, slot_permutation, window_ends

K_B_OVER_Q = 8.617333262e-5  # V/K: V_T = (k/q) T
EXP_CAP = 80.0  # exp(80) fits float32; v = 80 nV_T = 3.7 V is far above the diode's clamp




class CircuitModel(torch.nn.Module):
    """Differentiable circuit physics: forward(x[B, n_in], theta[B, n_params] or [n_params]) -> v[B, n_out].

    `voltages` gives the sampled node voltage before noise and ADC; `forward` adds the (known) ADC.
    State: z[2, B] = [Z0 i; v] in volts (columns are rows of the batch: small matmuls run faster so).
    """

    def __init__(self, r: float, l_: float, c: float, i_s: float, temperature_k: float,
                 cfg: CircuitConfig, perm: torch.Tensor | None):
        super().__init__()
        self.n_slots = cfg.n_inputs + cfg.n_params
        self.substeps, self.v_max = cfg.substeps, cfg.v_max
        self.adc_bits, self.full_scale = cfg.adc_bits, (-cfg.full_scale_v, cfg.full_scale_v)
        self.h_s = cfg.slot_s / cfg.substeps  # seconds per step
        self.c, self.ideality = c, cfg.ideality
        self.register_buffer("perm", perm_buffer(perm))
        # Output j is v at t_j = (j+1) T / n_out exactly. It falls in step k_j at fraction f_j of it
        # (f_j = 1: at the step's end); a fractional step from the step's start reaches it.
        self.samples = window_ends(self.n_slots * cfg.substeps, cfg.n_outputs)
        self.n_outputs = cfg.n_outputs
        self._rlc = (r, l_, c)
        self.register_buffer("phi", self._propagator(1.0)[0])
        self.register_buffer("drive", self._propagator(1.0)[1])
        fracs = sorted({f for lst in self.samples.values() for _, f in lst if f < 1.0})
        self._partial = {f: self._propagator(f) for f in fracs}
        self.set_diode(i_s, temperature_k)

    def _propagator(self, frac: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact linear RLC flow over frac * h: z -> phi @ z + drive * u (u the control in [-1, 1])."""
        r, l_, c = self._rlc
        z0 = math.sqrt(l_ / c)
        a = torch.tensor([[-r / l_, -z0 / l_, z0 / l_],  # d(Z0 i)/dt = Z0/L (V_in - R i - v)
                          [1.0 / (z0 * c), 0.0, 0.0],  # dv/dt = i / C (the diode is split off)
                          [0.0, 0.0, 0.0]], dtype=torch.float64)  # V_in held
        step = torch.linalg.matrix_exp(a * self.h_s * frac)
        return (step[:2, :2].to(torch.float32).contiguous(),
                (step[:2, 2] * self.v_max).to(torch.float32))

    def set_diode(self, i_s: float, temperature_k: float) -> None:
        """Constants of the exact diode sub-flow (see `_diode`)."""
        n_vt = self.ideality * K_B_OVER_Q * temperature_k
        self.n_vt, self.inv_nvt = n_vt, 1.0 / n_vt
        self.diode_rate = i_s / (self.c * n_vt)  # 1/s

    def _diode(self, v: torch.Tensor, dt_s: float) -> torch.Tensor:
        """Exact solution over dt_s of C dv/dt = -I_s (exp(v/nV_T) - 1) (the diode alone): with
        w = exp(-v/nV_T), dw/dt = rate (1 - w), so v(dt) = v - nV_T log1p(kappa (exp(v/nV_T) - 1)),
        kappa = 1 - exp(-rate dt) (~5e-9: computed in float64; float32 would round 1 - kappa to 1).
        Stable however stiff the diode; no overflow for v < 0."""
        kappa = -math.expm1(-self.diode_rate * dt_s)
        em1 = torch.expm1((v * self.inv_nvt).clamp(max=EXP_CAP))
        return torch.add(v, torch.log1p(kappa * em1), alpha=-self.n_vt)

    def voltages(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        rows, h = x.shape[0], self.h_s
        u = slot_controls(x, theta, self.perm)  # [B, n_slots] in [-1, 1]
        u_t = u.T.contiguous()  # [n_slots, B]
        drive = (u_t[:, None, :] * self.drive[None, :, None]).contiguous()  # [n_slots, 2, B]
        z = x.new_zeros(2, rows)  # circuit at rest
        out: list[torch.Tensor | None] = [None] * self.n_outputs
        step = 0
        # Strang splitting D(h/2) L(h) D(h/2), the half steps of neighbours merged: every step is L(h)
        # then D(h), and the true state at a step's end is D(h/2) after its L(h). (At rest, D acts as
        # the identity, so the first half step is a no-op.)
        for slot in range(self.n_slots):
            for _ in range(self.substeps):
                for j, frac in self.samples.get(step, ()):
                    if frac < 1.0:  # sample inside this step: from its start, D(f h/2) L(f h) D(f h/2)
                        v0 = self._diode(z[1], h / 2) if step else z[1]  # true state at the step start
                        phi, drv = self._partial[frac]
                        zs = phi @ torch.stack([z[0], self._diode(v0, frac * h / 2)]) + drv[:, None] * u_t[slot]
                        out[j] = self._diode(zs[1], frac * h / 2)
                z = torch.addmm(drive[slot], self.phi, z)  # exact linear RLC step
                for j, frac in self.samples.get(step, ()):
                    if frac == 1.0:
                        out[j] = self._diode(z[1], h / 2)
                z = torch.stack([z[0], self._diode(z[1], h)])  # the diode alone, exactly
                step += 1
        return torch.stack(out, dim=1)  # [B, n_out] volts

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return quantise(self.voltages(x, theta), self.full_scale, self.adc_bits)


class Circuit(SimulatedSystem):
    config_class = CircuitConfig

    def __init__(self, config: CircuitConfig | dict | None = None, **overrides):
        super().__init__(config, **overrides)
        cfg = self.config
        self._perm = slot_permutation(cfg.n_inputs, cfg.n_params, cfg.slot_order)
        gen = torch.Generator().manual_seed(cfg.seed)  # the device's fixed component tolerances
        err = cfg.component_error * cfg.mismatch * (2 * torch.rand(3, generator=gen, dtype=torch.float64) - 1)
        r, l_, c = cfg.components()
        self._device_rlc = (r * (1 + float(err[0])), l_ * (1 + float(err[1])), c * (1 + float(err[2])))
        self._device_model = CircuitModel(*self._device_rlc, cfg.i_s, cfg.temperature_k, cfg, self._perm)

    @property
    def spec(self) -> SystemSpec:
        cfg = self.config
        return SystemSpec(
            name="circuit", n_inputs=cfg.n_inputs, n_params=cfg.n_params, n_outputs=cfg.n_outputs,
            input_range=(-1.0, 1.0), param_range=(-1.0, 1.0), max_rows=cfg.max_rows,
            latency_s=self._spec_latency(),
        )

    def ideal_model(self) -> torch.nn.Module:
        cfg = self.config
        return CircuitModel(*cfg.components(), cfg.i_s, cfg.temperature_k, cfg, self._perm)

    def _measure(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        cfg, model = self.config, self._device_model
        walk = self.drift_walk("temperature", (1,), cfg.drift_temperature)
        if walk is not None:  # V_T goes as T; I_s doubles every 10 K
            dt = float(walk[0])
            model.set_diode(cfg.i_s * 2 ** (dt / 10.0), cfg.temperature_k + dt)
        v = model.voltages(x, theta)
        if cfg.noise > 0:
            v = v + cfg.johnson_noise_v * cfg.noise * self._randn(*v.shape)
        return quantise(v, model.full_scale, cfg.adc_bits, straight_through=False)


__all__ = ["Circuit", "CircuitConfig", "CircuitModel"]
