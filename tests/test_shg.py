"""The shg simulator's spectrometer window: every window_bins from 1 to 2M-1 images real SH bins."""
from __future__ import annotations

import pytest
import torch

from actors.systems.registry import build_system
from actors.systems.shg import Shg, ShgConfig


def direct_spectrum(u: torch.Tensor, m: int, kappa: float, n_c: float) -> torch.Tensor:
    """eta_n |E_n|^2 for n = 0 .. 2M-2 by the explicit double sum over k + l = n (no FFT), the
    nominal physics (beta = 0, unit gains): an independent check of the simulator. u[M] -> [2M-1]."""
    k = torch.arange(m, dtype=torch.float64)
    a = u.to(torch.float64) * torch.exp(-((k - m / 2) / (m / 3)) ** 2)
    e = torch.zeros(2 * m - 1, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            e[i + j] += a[i] * a[j]
    n = torch.arange(2 * m - 1, dtype=torch.float64)
    return torch.sinc(kappa * (n - n_c)) ** 2 * e**2


@pytest.mark.parametrize("m_in,m_par", [(48, 16), (5, 2)])
def test_every_window_up_to_all_bins_builds_and_measures(m_in, m_par):
    m = m_in + m_par
    for window in range(1, 2 * m):
        d = Shg(n_inputs=m_in, n_params=m_par, window_bins=window, n_outputs=min(window, 10), noise=0)
        bins = d._device_model.bins  # [2M-1, n_out]
        # each imaged bin goes to exactly one output, no bin twice, and the window is contiguous
        per_bin = bins.sum(1)
        assert per_bin.max() == 1.0 and int(per_bin.sum()) == window, window
        lit = per_bin.nonzero().flatten()
        assert int(lit[-1] - lit[0]) + 1 == window, window
        y = d.forward(torch.full((3, m_in), 0.8), torch.full((m_par,), 0.8))
        assert y.shape == (3, min(window, 10)) and torch.isfinite(y).all()


def test_full_window_images_every_sh_bin():
    """window_bins = 2M-1 with one output per bin: the clean device without chirp or fabrication
    error reads G eta_n |E_n|^2 for every n = 0 .. 2M-2, the outermost bins included."""
    m_in, m_par = 6, 3
    m = m_in + m_par
    d = build_system({"kind": "shg", "n_inputs": m_in, "n_params": m_par, "window_bins": 2 * m - 1,
                      "n_outputs": 2 * m - 1, "mismatch": 0, "noise": 0, "adc_bits": None})
    gen = torch.Generator().manual_seed(3)
    u = torch.rand(m, generator=gen)
    y = d.forward(u[:m_in].unsqueeze(0), u[m_in:])[0].to(torch.float64)
    ref = direct_spectrum(u, m, d.config.kappa_m / m, float(m))
    ref = ref * d._scale  # G: the simulator's calibration constant (open shaper peaks at 1)
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-7)
    assert y[0] > 0 and y[-1] > 0  # the first and last SH bins are imaged (and not dark here)


def test_default_window_unchanged_and_oversized_window_refused():
    d = Shg()
    lit = d._device_model.bins.sum(1).nonzero().flatten()
    assert (int(lit[0]), int(lit[-1])) == (32, 95)  # M = 64 bins centred on n_c = 64
    with pytest.raises(ValueError, match="window_bins=128 exceeds the 127 SH bins"):
        ShgConfig(window_bins=128)


def test_calibrated_twin_fits_the_chirp_the_ideal_model_lacks():
    """The physical constants are fittable buffers: a calibrated twin started from the nominal model
    (beta = 0) finds the device's residual chirp (0.02 rad/channel^2) from measurements alone, and
    predicts the device far better than the nominal model does."""
    from trainers.config import TwinConfig
    from trainers.twins import obtain_twin

    device = build_system({"kind": "shg", "seed": 0, "n_outputs": 10, "full_scale": 0.1})
    assert float(device.ideal_model().beta) == 0.0
    got = obtain_twin(device, TwinConfig(kind="calibrated", calibrate=["beta", "gain", "kappa", "n_c"],
                                         samples=1024, thetas=16, steps=200, cache=False))
    fitted = got.twin.model.ideal
    assert abs(abs(float(fitted.beta)) - 0.02) < 0.002  # the SH is even in beta's sign
    assert got.twin.info["error_before"] > 1.0  # the nominal model: worse than each output's mean
    # 0.55 measured with this small fit (1024 rows, 200 steps; 4096 rows and 600 steps give ~0.15,
    # where device noise alone gives ~0.1): far below the nominal model's ~9
    assert got.twin.info["error"] < 0.7
