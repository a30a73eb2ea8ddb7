"""`shg`: broadband second-harmonic generation behind a pulse shaper (PAT's optical PNN), PHYSICS.md 2.

Controls u = concat(x, theta) set the shaper's transmission per channel, u_k in [0, 1], M = n_inputs +
n_params channels (default 48 + 16 = 64).
  fundamental  a_k = g_k u_k s_k exp(i beta (k - k0)^2),  s_k = exp(-((k - k0)/w)^2), k0 = M/2, w = M/3
               (g_k: the shaper's per-channel gain, 1 in the model)
  SH field     E_n = sum_{k+l=n} a_k a_l,  n = 0 .. 2M-2   (a self-convolution, done by FFT)
  detected     y_n = G eta_n |E_n|^2,  eta_n = sinc^2(kappa (n - n_c)),  kappa = 1.5/M, n_c = M
               (sinc(z) = sin(pi z)/(pi z): the phase-matching band's first zeros sit 2M/3 bins
               from its centre). The spectrometer images the `window_bins` SH bins centred on the
               nominal n_c (default M, where the light is: the outer bins of 0 .. 2M-2 stay dark, so a
               PNN reading its first outputs would read nothing; window_bins = 2M-1 images them all),
               and adjacent imaged bins are summed into n_outputs (default M) outputs.
G is fixed so that the nominal spectrum with every channel open (u = 1) peaks at 1.0 (units of the
spectrometer's calibrated level); the ADC full scale is 1.25 of that, 12 bits by default.

Device vs ideal model (mismatch=1): residual chirp beta = 0.02 rad/channel^2 (0 in the model); kappa
and n_c off by 5 % (seeded signs); shaper gain error 3 % per channel (seeded). Noise (noise=1):
common-mode laser power 1 % per measurement (the SH scales with its square) and detector noise 0.5 %
of full scale; the 12-bit ADC (in device and model alike) clips at full scale. Drift (our addition,
PHYSICS.md gives none for this system): the laser power performs a seeded log random walk of
`drift_power` per sqrt(call or second) at drift=1.
Latency: the real table needs about 5 ms per call (shaper refresh) + 2 ms per row (spectrometer
exposure): set latency_call_s=0.005, latency_row_s=0.002 to have it slept (0 by default).
"""
from __future__ import annotations


import torch

from ..spec import SystemSpec
from .configs import ShgConfig
from .base import SimulatedSystem, quantise




def binning_matrix(n_bins: int, n_outputs: int, start: int = 0, count: int | None = None) -> torch.Tensor:
    """[n_bins, n_outputs] 0/1 matrix summing adjacent bins: of the `count` bins from `start` (default
    all), bin start + j goes to output floor(j * n_outputs / count); the others go nowhere."""
    count = n_bins - start if count is None else count
    out = torch.zeros(n_bins, n_outputs)
    j = torch.arange(count)
    out[start + j, (j * n_outputs) // count] = 1.0
    return out


class ShgModel(torch.nn.Module):
    """Differentiable SHG physics: forward(x[B, n_in], theta[B, n_params] or [n_params]) -> y[B, n_out].

    `intensity` is the spectrum before the ADC; `forward` adds the (known) ADC. The physical constants
    are float buffers, so a calibrated twin can fit them by name (`TwinConfig.calibrate`): `beta`
    (residual chirp, rad/channel^2, scalar), `gain` (shaper gain per channel, [M]), `kappa` (phase
    matching, 1/bin, scalar) and `n_c` (phase-matching centre, bins, scalar); the field and eta are
    rebuilt from them on every call (O(M), negligible next to the FFT).
    """

    def __init__(self, m: int, n_outputs: int, beta: float, kappa: float, n_c: float,
                 gain: torch.Tensor, scale: float, full_scale: float, adc_bits: int | None,
                 window_bins: int | None = None):
        super().__init__()
        self.m, self.n_outputs, self.adc_bits = m, n_outputs, adc_bits
        self.full_scale = (0.0, float(full_scale))
        self.scale = float(scale)
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.register_buffer("gain", gain.detach().clone().to(torch.float32))
        self.register_buffer("kappa", torch.tensor(float(kappa)))
        self.register_buffer("n_c", torch.tensor(float(n_c)))
        window = window_bins or m
        # Centred on the nominal n_c = M (the calibration does not drift), then slid inwards so the
        # window stays within the 2M-1 bins 0 .. 2M-2: a wide window (up to 2M-1, all bins) would
        # otherwise run past bin 2M-2, as the centre M sits one bin right of the middle bin M-1.
        start = min(max(m - window // 2, 0), 2 * m - 1 - window)
        self.register_buffer("bins", binning_matrix(2 * m - 1, n_outputs, start, window))  # [2M-1, n_out]
        self._nfft = 2 * m  # >= 2M-1: the circular convolution equals the linear one

    def field(self) -> torch.Tensor:
        """[M] complex: s_k g_k exp(i beta (k - k0)^2), built in float64 (the chirp phase reaches
        beta (M/2)^2, ~20 rad at M = 64) and handed on in complex64."""
        k = torch.arange(self.m, dtype=torch.float64, device=self.gain.device)
        k0, w = self.m / 2, self.m / 3
        envelope = torch.exp(-((k - k0) / w) ** 2) * self.gain.to(torch.float64)
        phase = self.beta.to(torch.float64) * (k - k0) ** 2
        return torch.polar(envelope, phase).to(torch.complex64)

    def eta(self) -> torch.Tensor:
        """[2M-1] phase-matching efficiency sinc^2(kappa (n - n_c)) per SH bin."""
        n = torch.arange(2 * self.m - 1, dtype=torch.float64, device=self.gain.device)
        return (torch.sinc(self.kappa.to(torch.float64) * (n - self.n_c.to(torch.float64))) ** 2).to(torch.float32)

    def intensity(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if theta.ndim == 1:
            theta = theta.expand(x.shape[0], -1)
        u = torch.cat([x, theta], dim=1)  # [B, M] transmissions
        a = u.to(torch.complex64) * self.field()  # [B, M] fundamental field
        spec = torch.fft.fft(a, n=self._nfft, dim=1)
        e = torch.fft.ifft(spec * spec, dim=1)[:, : 2 * self.m - 1]  # [B, 2M-1] E_n = sum_{k+l=n} a_k a_l
        sh = (e.real**2 + e.imag**2) * self.eta()  # phase-matched SH power per bin
        return self.scale * (sh @ self.bins)  # [B, n_out]

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return quantise(self.intensity(x, theta), self.full_scale, self.adc_bits)


class Shg(SimulatedSystem):
    config_class = ShgConfig

    def __init__(self, config: ShgConfig | dict | None = None, **overrides):
        super().__init__(config, **overrides)
        cfg = self.config
        m = self.m = cfg.n_inputs + cfg.n_params
        gen = torch.Generator().manual_seed(cfg.seed)  # the device's fixed fabrication error
        signs = torch.randint(0, 2, (2,), generator=gen).to(torch.float64) * 2 - 1
        gain = 1 + cfg.gain_error * cfg.mismatch * torch.randn(m, generator=gen, dtype=torch.float64)
        kappa, n_c = cfg.kappa_m / m, float(m)
        rel = cfg.phase_matching_error * cfg.mismatch
        # G: a calibration constant fixed by the nominal physics (u = 1 everywhere peaks at 1.0).
        probe = ShgModel(m, self._n_out, 0.0, kappa, n_c, torch.ones(m), 1.0, cfg.full_scale, None,
                         cfg.window_bins)
        with torch.no_grad():
            self._scale = 1.0 / float(probe.intensity(torch.ones(1, m), torch.zeros(0)).max())
        self._nominal = dict(m=m, n_outputs=self._n_out, beta=0.0, kappa=kappa, n_c=n_c,
                             gain=torch.ones(m), scale=self._scale, window_bins=cfg.window_bins)
        self._device_model = ShgModel(
            m, self._n_out, cfg.beta * cfg.mismatch, kappa * (1 + rel * float(signs[0])),
            n_c * (1 + rel * float(signs[1])), gain, self._scale, cfg.full_scale, cfg.adc_bits,
            cfg.window_bins)

    @property
    def _n_out(self) -> int:
        return self.config.n_outputs or (self.config.n_inputs + self.config.n_params)

    @property
    def spec(self) -> SystemSpec:
        cfg = self.config
        return SystemSpec(
            name="shg", n_inputs=cfg.n_inputs, n_params=cfg.n_params, n_outputs=self._n_out,
            input_range=(0.0, 1.0), param_range=(0.0, 1.0), max_rows=cfg.max_rows,
            latency_s=self._spec_latency(),
        )

    def ideal_model(self) -> torch.nn.Module:
        return ShgModel(**self._nominal, full_scale=self.config.full_scale, adc_bits=self.config.adc_bits)

    def _measure(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        cfg, model = self.config, self._device_model
        y = model.intensity(x, theta)  # [B, n_out]
        walk = self.drift_walk("log_power", (1,), cfg.drift_power)
        if walk is not None:  # slow laser power drift; the SH goes as its square
            y = y * torch.exp(2 * walk)
        if cfg.noise > 0:
            power = 1 + cfg.laser_noise * cfg.noise * self._randn(x.shape[0], 1)  # per-row pulse energy
            y = y * power**2 + cfg.detector_noise * cfg.noise * cfg.full_scale * self._randn(*y.shape)
        return quantise(y, model.full_scale, cfg.adc_bits, straight_through=False)


__all__ = ["Shg", "ShgConfig", "ShgModel", "binning_matrix"]
