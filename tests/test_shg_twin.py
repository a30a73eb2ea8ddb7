"""A calibrated twin of the shg simulator: its residual chirp found by `TwinConfig.scan` (a grid search
before the gradient fit), on real measurements of a real (simulated) device."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from actors.systems.registry import build_system
from trainers.config import TwinConfig
from trainers.twins import (build_twin, collect, fit, measure_data, sample_thetas, scan_constants,
                            twin_error, twin_from_state, twin_state)

# M = 96 + 32 = 128 channels: the device's chirp (beta = 0.02) turns the phase by 0.02 * 64^2 = 82 rad at
# the band's edge, so the twin's error oscillates in beta and only a scan lands in the right minimum.
SYSTEM = {"kind": "shg", "seed": 3, "n_inputs": 96, "n_params": 32, "n_outputs": 10, "window_bins": 20,
          "full_scale": 0.03}


def _fresh(device, seed=11):
    gen = torch.Generator().manual_seed(seed)
    return collect(device, sample_thetas(device.spec, 6, gen), 48, gen)


def test_scan_finds_the_device_chirp_and_the_fit_beats_the_ideal_twin():
    device = build_system(SYSTEM)
    true_beta = float(device._device_model.beta)  # the simulator's fabrication truth, for the check only
    cfg = TwinConfig(kind="calibrated", calibrate=["gain"], scan={"beta": (0.0, 0.05, 501)}, samples=1024,
                     thetas=16, steps=60, lr=0.003)
    gen = torch.Generator().manual_seed(0)
    data = measure_data(device, cfg, gen)
    twin = build_twin(cfg, device.spec, device.ideal_model)
    figures = fit(twin, data, cfg, gen)
    found = figures["scanned"]["beta"]
    assert abs(found - true_beta) < 2e-4, (found, true_beta)  # the grid step is 1e-4, refined to 4e-7
    fresh = _fresh(device)
    ideal = build_twin(TwinConfig(kind="ideal"), device.spec, device.ideal_model)
    err_ideal, err_cal = twin_error(ideal, fresh), twin_error(twin, fresh)
    # the ideal model (no chirp) is far off; the calibrated twin is down near the noise
    assert err_ideal > 1.0 and err_cal < 0.25, (err_ideal, err_cal)

    # the scanned constant is part of the saved state: the rebuilt twin predicts the same
    rebuilt = twin_from_state(twin_state(twin), device.spec, device.ideal_model)
    x, theta = fresh.x[0], fresh.theta[0]
    with torch.no_grad():
        assert torch.equal(rebuilt(x, theta), twin(x, theta))
    assert float(rebuilt.model.ideal.beta) == pytest.approx(float(twin.model.ideal.beta))


def test_without_the_scan_the_gradient_fit_stays_far_off():
    """The reason the scan exists: from beta = 0 the gradient fit does not find the chirp."""
    device = build_system(SYSTEM)
    cfg = TwinConfig(kind="calibrated", calibrate=["gain", "beta"], samples=1024, thetas=16, steps=60,
                     lr=0.003)
    gen = torch.Generator().manual_seed(0)
    twin = build_twin(cfg, device.spec, device.ideal_model)
    fit(twin, measure_data(device, cfg, gen), cfg, gen)
    assert twin_error(twin, _fresh(device)) > 0.5


def test_scan_errors_name_the_problem():
    with pytest.raises(ValidationError, match=r"twin.scan\['beta'\].*low < high"):
        TwinConfig(kind="calibrated", scan={"beta": (0.05, 0.0, 11)})
    with pytest.raises(ValidationError, match="points >= 2"):
        TwinConfig(kind="calibrated", scan={"beta": (0.0, 0.05, 1)})
    device = build_system({**SYSTEM, "n_inputs": 12, "n_params": 4})
    gen = torch.Generator().manual_seed(0)
    data = collect(device, sample_thetas(device.spec, 2, gen), 8, gen)
    cal = build_twin(TwinConfig(kind="calibrated"), device.spec, device.ideal_model)
    with pytest.raises(ValueError, match="no constant 'chrip'"):
        scan_constants(cal, data, {"chrip": (0.0, 1.0, 3)})
    with pytest.raises(ValueError, match="'gain' has 16 values"):
        scan_constants(cal, data, {"gain": (0.0, 1.0, 3)})
    mlp = build_twin(TwinConfig(kind="mlp"), device.spec)
    with pytest.raises(ValueError, match="needs a 'calibrated' or 'residual' twin, not 'mlp'"):
        scan_constants(mlp, data, {"beta": (0.0, 0.05, 3)})


def test_scan_changes_the_cache_key_only_when_used():
    from trainers.twins import cache_key

    device = build_system({**SYSTEM, "n_inputs": 12, "n_params": 4})
    plain = TwinConfig(kind="calibrated")
    key_plain, _ = cache_key(device, plain)
    key_same, _ = cache_key(device, TwinConfig(kind="calibrated", scan={}))
    key_scan, _ = cache_key(device, TwinConfig(kind="calibrated", scan={"beta": (0.0, 0.05, 11)}))
    assert key_plain == key_same and key_scan != key_plain
