"""`plate`: a driven multimode plate read by a microphone (PAT's mechanical PNN), PHYSICS.md 3.

Units: time in ms, frequency in kHz (so omega in rad/ms), drive in volts, mode amplitudes in units of
their static deflection at full force, microphone signal in units of its full scale.

Controls u = concat(x, theta) (n_inputs + n_params slots; `slot_order="interleave"` spreads theta
between the inputs instead), each in [-1, 1] V and held for one slot of tau = 1 ms.
  speaker   F(t) = tanh(g u(t)), g = 1.5 (coil saturation)
  modes     x_m'' + (w_m/Q_m) x_m' + w_m^2 x_m + gamma_m x_m^3 = b_m F(t),  m = 1..K (K = 12)
            f_m = w_m / 2 pi spread geometrically over 0.2 .. 2 kHz with a seeded 5 % jitter,
            Q_m ~ U(25, 35), b_m = w_m^2 beta_m (beta_m random sign times U(0.5, 1): static deflection),
            gamma_m = w_m^2 d_m, d_m = duffing * U(0.5, 1.5), duffing = 0.004 (hardening; random controls
            drive amplitudes up to ~9, where it raises a mode's frequency by up to ~10 %)
  microphone s(t) = sum_m c_m x_m'(t) (c_m random sign times U(0.5, 1) / w_m, normalised so that the
            RMS of s for uniformly random controls is 0.15 of full scale)
  output j  mean of s(t)^2 over the j-th of n_outputs equal windows of the whole record.
The structure (f, Q, b, gamma, c) is the plate itself, drawn from `structure_seed`; model and device share it.

Integration (the same code is the device and the ideal model): a splitting scheme with step h =
tau / substeps (default 0.25 ms). Each step applies the cubic restoring force as a kick
v_m -= h gamma_m x_m^3, then propagates the damped linear modes under the held force *exactly* (3x3
augmented matrix exponentials, computed once per call). The microphone is sampled inside each step from the
exact linear flow at `samples_per_period` (default 20) samples per period of the highest mode (40
kHz by default), so s(t)^2 is resolved. Only the kick limits the step: it is stable while
h w_m sqrt(3 d_m) |x_m| < 2, about 2x margin at h = 0.25 ms for the amplitudes random or resonant
(square-wave) controls reach, and agrees with a 10x finer step to about 1 % (tests/test_systems_contract.py checks it).
Cost: (n_slots * substeps) steps of a few [2K, B] ops: 30-40 ms for 256 rows on one quiet core.

Device vs ideal model (mismatch=1): every f_m and Q_m off by a seeded Gaussian 1 %. Noise (noise=1):
microphone noise 1 % of full scale per sample (before squaring, so it also adds its power). Drift:
the device's f_m all scale by (1 + alpha dT), alpha = -1.3e-4 / K (steel), dT a seeded random walk
of `drift_temperature` K per sqrt(call or second) at drift=1. With adc_bits the microphone signal is
digitised on [-1, 1] full scale (in device and model alike).
"""
from __future__ import annotations

import math

import torch

from ..spec import SystemSpec
from .configs import PlateConfig
from .base import SimulatedSystem, quantise
from .slots import perm_buffer, slot_controls, slot_permutation, window_mean




class PlateModel(torch.nn.Module):
    """Differentiable plate physics: forward(x[B, n_in], theta[B, n_params] or [n_params]) -> y[B, n_out].

    `signal` gives the microphone samples s[B, N] before noise and ADC; `readout` squares and averages.
    """

    def __init__(self, freq_khz: torch.Tensor, q: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor,
                 c: torch.Tensor, n_slots: int, n_outputs: int, cfg: PlateConfig,
                 perm: torch.Tensor | None):
        super().__init__()
        self.n_slots, self.n_outputs = n_slots, n_outputs
        self.coil_gain, self.adc_bits = cfg.coil_gain, cfg.adc_bits
        self.substeps = cfg.substeps
        h = cfg.slot_ms / cfg.substeps  # ms
        self.samples = max(1, math.ceil(h * cfg.f_max_khz * cfg.samples_per_period))
        self.h = h
        self.register_buffer("perm", perm_buffer(perm))
        self._set_structure(freq_khz, q, b, gamma, c)
        n_samples = n_slots * cfg.substeps * self.samples
        self.register_buffer("window_mean", window_mean(n_samples, n_outputs))  # [N, n_out]

    def _set_structure(self, freq_khz, q, b, gamma, c) -> None:
        """Precompute the exact linear propagators for step h and for the sample points inside it."""
        k = freq_khz.shape[0]
        w = 2 * math.pi * freq_khz.to(torch.float64)  # rad/ms
        a = torch.zeros(k, 3, 3, dtype=torch.float64)  # d/dt [x, v, F] = a @ [x, v, F], F held
        a[:, 0, 1] = 1.0
        a[:, 1, 0] = -(w**2)
        a[:, 1, 1] = -w / q.to(torch.float64)
        a[:, 1, 2] = b.to(torch.float64)
        step = torch.linalg.matrix_exp(a * self.h)  # [K, 3, 3]
        # z = [x_1..x_K, v_1..v_K]; z_next = z @ phi_t + F * drive (z as a row here)
        phi_t = torch.zeros(2 * k, 2 * k, dtype=torch.float64)
        idx = torch.arange(k)
        for r, rr in ((0, idx), (1, idx + k)):
            for s_, ss in ((0, idx), (1, idx + k)):
                phi_t[ss, rr] = step[:, r, s_]
        drive = torch.cat([step[:, 0, 2], step[:, 1, 2]])  # [2K]
        # microphone samples at t = h j / S, j = 1..S: s = z @ sample_z + F * sample_f
        taus = self.h * torch.arange(1, self.samples + 1, dtype=torch.float64) / self.samples
        sub = torch.linalg.matrix_exp(a[None] * taus[:, None, None, None])  # [S, K, 3, 3]
        c64 = c.to(torch.float64)
        sample_z = torch.cat([(c64 * sub[:, :, 1, 0]).T, (c64 * sub[:, :, 1, 1]).T])  # [2K, S]
        sample_f = (c64 * sub[:, :, 1, 2]).sum(1)  # [S]
        # The kick v_m -= h gamma_m x_m^3 precedes each linear step, so its effect on the next state
        # and on the samples is a matrix applied to x^3: phi[:, K:] diag(-h gamma), sample_z[K:] too.
        kick = -self.h * gamma.to(torch.float64)  # [K]
        phi = phi_t.T
        for name, val in (("phi", phi), ("phi_kick", phi[:, k:] * kick[None, :]), ("drive", drive),
                          ("sample_z", sample_z), ("sample_kick", sample_z[k:] * kick[:, None]),
                          ("sample_f", sample_f)):
            self.register_buffer(name, val.to(torch.float32).contiguous())
        self.k = k

    def signal(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        rows, k = x.shape[0], self.k
        u = slot_controls(x, theta, self.perm)  # [B, n_slots] volts
        force = torch.tanh(self.coil_gain * u)  # [B, n_slots]
        # State kept as columns, z[2K, B] = [x_1..x_K; v_1..v_K] (small matmuls are faster this way).
        f_drive = (force.T[:, None, :] * self.drive[None, :, None]).contiguous()  # [n_slots, 2K, B]
        z = x.new_zeros(2 * k, rows)  # plate at rest
        states, cubes = [], []
        for slot in range(self.n_slots):
            fd = f_drive[slot]
            for _ in range(self.substeps):
                # One step: the cubic kick, then the exact damped linear flow under the held force.
                x3 = z[:k].pow(3)
                states.append(z)
                cubes.append(x3)
                z = torch.mm(self.phi, z)  # (in place below: mm's output is not needed for backward)
                z.add_(fd).addmm_(self.phi_kick, x3)
        steps = len(states)
        zs = torch.stack(states, dim=1).reshape(2 * k, steps * rows)  # [2K, steps*B]
        x3s = torch.stack(cubes, dim=1).reshape(k, steps * rows)  # [K, steps*B]
        # Microphone samples inside every step, from the exact linear flow after the kick: [S, steps, B].
        s = torch.mm(self.sample_z.T, zs).addmm_(self.sample_kick.T, x3s).reshape(-1, steps, rows)
        s = s + self.sample_f[:, None, None] * force.T.repeat_interleave(self.substeps, dim=0)[None]
        return s.permute(2, 1, 0).reshape(rows, -1)  # [B, N] samples in time order, N = steps * S

    def readout(self, s: torch.Tensor) -> torch.Tensor:
        """Digitise s (if an ADC is configured), square and average per window -> [B, n_out]."""
        s = quantise(s, (-1.0, 1.0), self.adc_bits)
        return (s * s) @ self.window_mean

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return self.readout(self.signal(x, theta))


class Plate(SimulatedSystem):
    config_class = PlateConfig

    def __init__(self, config: PlateConfig | dict | None = None, **overrides):
        super().__init__(config, **overrides)
        cfg = self.config
        k = cfg.modes
        g = torch.Generator().manual_seed(cfg.structure_seed)
        rand = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
        sign = lambda n: torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1  # noqa: E731
        ratio = cfg.f_max_khz / cfg.f_min_khz
        freq = cfg.f_min_khz * ratio ** (torch.arange(k, dtype=torch.float64) / max(1, k - 1))
        if k > 2:  # seeded 5 % jitter of the inner modes; the band edges stay where PHYSICS.md puts them
            freq[1:-1] *= 1 + 0.05 * (2 * rand(k - 2) - 1)
        q = cfg.q + 5.0 * (2 * rand(k) - 1)
        w = 2 * math.pi * freq
        b = w**2 * sign(k) * (0.5 + 0.5 * rand(k))
        gamma = w**2 * cfg.duffing * (0.5 + rand(k))
        c = sign(k) * (0.5 + 0.5 * rand(k)) / w
        self._n_slots = cfg.n_inputs + cfg.n_params
        self._perm = slot_permutation(cfg.n_inputs, cfg.n_params, cfg.slot_order)
        # Calibrate the microphone gain on the nominal plate: RMS of s for random controls = 0.15 FS.
        probe = PlateModel(freq, q, b, gamma, c, self._n_slots, cfg.n_outputs,
                           cfg.model_copy(update={"adc_bits": None}), self._perm)
        u = 2 * torch.rand(16, self._n_slots, generator=g) - 1
        with torch.no_grad():
            rms = float(probe.signal(u[:, : cfg.n_inputs], u[:, cfg.n_inputs :]).pow(2).mean().sqrt())
        c = c * (0.15 / max(rms, 1e-12))
        self._nominal = (freq, q, b, gamma, c)
        gm = torch.Generator().manual_seed(cfg.seed)  # the device's fixed calibration error
        rel = cfg.freq_error * cfg.mismatch
        self._device_freq = freq * (1 + rel * torch.randn(k, generator=gm, dtype=torch.float64))
        self._device_q = q * (1 + rel * torch.randn(k, generator=gm, dtype=torch.float64))
        self._device_model = self._model(self._device_freq, self._device_q)

    def _model(self, freq, q) -> PlateModel:
        _, _, b, gamma, c = self._nominal
        return PlateModel(freq, q, b, gamma, c, self._n_slots, self.config.n_outputs, self.config, self._perm)

    @property
    def spec(self) -> SystemSpec:
        cfg = self.config
        return SystemSpec(
            name="plate", n_inputs=cfg.n_inputs, n_params=cfg.n_params, n_outputs=cfg.n_outputs,
            input_range=(-1.0, 1.0), param_range=(-1.0, 1.0), max_rows=cfg.max_rows,
            latency_s=self._spec_latency(),
        )

    def ideal_model(self) -> torch.nn.Module:
        freq, q, *_ = self._nominal
        return self._model(freq, q)

    def _measure(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        cfg, model = self.config, self._device_model
        walk = self.drift_walk("temperature", (1,), cfg.drift_temperature)
        if walk is not None:  # temperature moves every mode frequency together
            freq = self._device_freq * (1 + cfg.alpha_per_k * float(walk[0]))
            freq_, q, b, gamma, c = self._nominal
            model._set_structure(freq, self._device_q, b, gamma, c)
        s = model.signal(x, theta)
        if cfg.noise > 0:
            s = s + cfg.mic_noise * cfg.noise * self._randn(*s.shape)
        return model.readout(s)


__all__ = ["Plate", "PlateConfig", "PlateModel", "slot_permutation"]
