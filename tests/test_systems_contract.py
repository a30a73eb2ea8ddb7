"""The contract every physical system honours, checked on every system physfarm ships or documents:
the simulators, a recorded device (fit from data made here), a network instrument (against a loopback
server) and the third-party example in examples/mylab. Plus a few physics sanity checks per simulator.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.errors import DeviceError, EnvelopeError
from actors.protocol import PhysicalSystem
from actors.systems.registry import BUILTIN, build_system

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))  # so the import-path kind 'mylab.devices:Spectrometer' resolves

SYSTEMS = ["oscillators", "shg", "plate", "circuit", "cavity", "recorded", "instrument", "mylab"]
NO_DRIFT = {"recorded"}  # a replayed fit has no drift

# Small but representative sizes (the defaults are tested for n_outputs >= 10 separately).
BASE = {
    "oscillators": {"kind": "oscillators", "n": 10},
    "shg": {"kind": "shg"},
    "plate": {"kind": "plate", "n_inputs": 16, "n_params": 8},
    "circuit": {"kind": "circuit", "n_inputs": 16, "n_params": 8},
    "cavity": {"kind": "cavity", "n_inputs": 24, "n_params": 8, "n_outputs": 16},
    "mylab": {"kind": "mylab.devices:Spectrometer"},
}
RECORDED_LAYOUT = {"n_inputs": 6, "n_params": 2, "n_outputs": 10}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def recorded_file(tmp_path_factory) -> Path:
    """Measured rows of a small noisy cavity, as a lab would bring them."""
    sim = build_system({"kind": "cavity", **RECORDED_LAYOUT, "noise": 0.5, "seed": 3})
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1200, 6, generator=gen)
    theta = torch.rand(1200, 2, generator=gen)
    y = sim.forward(x, theta)
    path = tmp_path_factory.mktemp("recorded") / "cavity_rows.npz"
    np.savez(path, controls=torch.cat([x, theta], 1).numpy(), responses=y.numpy())
    return path


@pytest.fixture(scope="module")
def make(recorded_file):
    """make(name, **knobs) -> a system; knobs: seed, mismatch, noise, drift, fault_rate, latencies."""
    from actors.instrument.server import InstrumentServer

    servers, systems = [], []

    def _make(name: str, **knobs):
        if name == "recorded":
            knobs.pop("mismatch", None)  # a fit has no separate nominal model
            cfg = {"kind": "recorded", "path": str(recorded_file), **RECORDED_LAYOUT,
                   "input_range": (0.0, 1.0), "param_range": (0.0, 1.0), "epochs": 150, **knobs}
            system = build_system(cfg)
        elif name == "instrument":
            served = {"kind": "oscillators", "n": 10, **knobs}
            server = InstrumentServer(served, port=0, log=lambda msg: None)
            _, port = server.start()
            servers.append(server)
            system = build_system({"kind": "instrument", "port": port, "read_timeout_s": 10,
                                   "twin_system": {"kind": "oscillators", "n": 10}})
        else:
            system = build_system({**BASE[name], **knobs})
        systems.append(system)
        return system

    yield _make
    for system in systems:
        system.close()
    for server in servers:
        server.stop()


def inputs(spec, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    (xl, xh), (pl, ph) = spec.input_range, spec.param_range
    x = xl + (xh - xl) * torch.rand(rows, spec.n_inputs, generator=gen)
    theta = pl + (ph - pl) * torch.rand(spec.n_params, generator=gen)
    return x, theta


def scale_of(y: torch.Tensor) -> float:
    return max(1e-3, float(y.abs().max()))


@pytest.mark.parametrize("name", SYSTEMS)
def test_shapes_and_dtypes(make, name):
    d = make(name, seed=0)
    assert isinstance(d, PhysicalSystem)
    spec = d.spec
    assert spec.n_outputs >= 10
    x, theta = inputs(spec, 5)
    y = d.forward(x, theta)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    assert y.shape == (5, spec.n_outputs) and torch.isfinite(y).all()
    y_rows = d.forward(x.numpy().astype(np.float64), theta.expand(5, -1).contiguous())  # per-row theta, numpy x
    assert y_rows.shape == (5, spec.n_outputs) and y_rows.dtype == torch.float32


@pytest.mark.parametrize("name", SYSTEMS)
def test_envelope_and_nonfinite_refused(make, name):
    d = make(name, seed=0)
    spec = d.spec
    x, theta = inputs(spec, 4)
    lo, hi = spec.input_range
    bad = x.clone()
    bad[2, 1] = hi + 0.5
    with pytest.raises(EnvelopeError, match=rf"x value .* outside the input range \[{lo}, {hi}\]"):
        d.forward(bad, theta)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(EnvelopeError, match="x contains a non-finite value"):
        d.forward(bad, theta)
    with pytest.raises(EnvelopeError, match="x must have shape"):
        d.forward(x[:, :-1], theta)
    if spec.n_params:
        plo, phi = spec.param_range
        bad_t = theta.clone()
        bad_t[-1] = plo - 1.0
        with pytest.raises(EnvelopeError, match=rf"theta value .* outside the parameter range \[{plo}, {phi}\]"):
            d.forward(x, bad_t)
        bad_t[-1] = float("inf")
        with pytest.raises(EnvelopeError, match="theta contains a non-finite value"):
            d.forward(x, bad_t)
    assert torch.isfinite(d.forward(x, theta)).all()  # a refusal leaves the device usable


@pytest.mark.parametrize("name", SYSTEMS)
def test_seeded_determinism(make, name):
    drift = 0.0 if name in NO_DRIFT else 1.0
    a, b = make(name, seed=7, drift=drift), make(name, seed=7, drift=drift)
    x, theta = inputs(a.spec, 6, seed=1)
    for _ in range(3):
        assert torch.equal(a.forward(x, theta), b.forward(x, theta))
    c = make(name, seed=8, drift=drift)
    assert not torch.equal(make(name, seed=7, drift=drift).forward(x, theta), c.forward(x, theta))


@pytest.mark.parametrize("name", SYSTEMS)
def test_rows_are_independent_without_noise(make, name):
    d = make(name, seed=0, noise=0.0)
    spec = d.spec
    x, theta = inputs(spec, 8, seed=2)
    gen = torch.Generator().manual_seed(3)
    pl, ph = spec.param_range
    thetas = pl + (ph - pl) * torch.rand(8, spec.n_params, generator=gen)  # a different theta per row
    y = d.forward(x, thetas)
    tol = 1e-5 * scale_of(y)
    for i in (0, 3, 7):
        alone = d.forward(x[i : i + 1], thetas[i])
        assert torch.allclose(y[i], alone[0], rtol=1e-5, atol=tol), (name, i, (y[i] - alone[0]).abs().max())


@pytest.mark.parametrize("name", SYSTEMS)
def test_ideal_model_equals_clean_device_and_is_differentiable(make, name):
    d = make(name, seed=5, mismatch=0.0, noise=0.0, drift=0.0)
    spec = d.spec
    x, theta = inputs(spec, 6, seed=4)
    model = d.ideal_model()
    assert isinstance(model, torch.nn.Module)
    y_dev = d.forward(x, theta)
    y_ideal = model(x, theta)
    assert y_ideal.shape == y_dev.shape
    assert torch.allclose(y_dev, y_ideal.detach().float(), rtol=1e-5, atol=1e-5 * scale_of(y_dev)), \
        (y_dev - y_ideal).abs().max()
    xg = x.clone().requires_grad_(True)
    tg = theta.clone().requires_grad_(True)
    w = torch.randn(y_dev.shape, generator=torch.Generator().manual_seed(0))
    gx, gt = torch.autograd.grad((model(xg, tg) * w).sum(), [xg, tg])
    assert torch.isfinite(gx).all() and torch.isfinite(gt).all()
    assert gx.abs().sum() + gt.abs().sum() > 0
    if name not in ("instrument", "recorded"):  # a mismatched device differs from its own ideal model
        mism = make(name, seed=5, noise=0.0)
        assert not torch.allclose(mism.forward(x, theta), mism.ideal_model()(x, theta).detach(), atol=1e-6)


@pytest.mark.parametrize("name", [s for s in SYSTEMS if s not in NO_DRIFT])
def test_drift_moves_outputs_over_calls(make, name):
    x, theta = None, None
    for drift, should_move in ((0.0, False), (10.0, True)):
        d = make(name, seed=2, noise=0.0, drift=drift)
        if x is None:
            x, theta = inputs(d.spec, 4, seed=5)
        first = d.forward(x, theta)
        for _ in range(40):
            d.forward(x[:1], theta)
        later = d.forward(x, theta)
        moved = float((later - first).abs().max())
        if should_move:
            assert moved > 1e-4 * scale_of(first), (name, moved)
        else:
            assert moved == 0.0, (name, moved)


def test_drift_by_wall_time():
    d = build_system({"kind": "cavity", "noise": 0, "drift": 20.0, "drift_clock": "time"})
    x, theta = inputs(d.spec, 2)
    first = d.forward(x, theta)
    again = d.forward(x, theta)
    time.sleep(0.3)
    later = d.forward(x, theta)
    # a random walk's spread grows as sqrt(elapsed): ~0.3 s moves it far more than the ms between calls
    assert float((later - first).abs().max()) > 3 * float((again - first).abs().max())


@pytest.mark.parametrize("name", SYSTEMS)
def test_fault_rate_honoured(make, name):
    d = make(name, seed=11, fault_rate=0.3)
    x, theta = inputs(d.spec, 1)
    faults = 0
    for _ in range(200):
        try:
            d.forward(x, theta)
        except DeviceError:
            faults += 1
    assert 30 <= faults <= 90, faults  # 60 expected; binomial std 6.5
    assert torch.isfinite(make(name, seed=11).forward(x, theta)).all()


@pytest.mark.parametrize("name", SYSTEMS)
def test_latency_honoured(make, name):
    d = make(name, seed=0, latency_call_s=0.02, latency_row_s=0.001)
    x, theta = inputs(d.spec, 10)
    d.forward(x, theta)  # warm-up (connects, fits)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        d.forward(x, theta)
        times.append(time.perf_counter() - t0)
    assert min(times) >= 0.030 - 0.001, times
    assert min(times) <= 0.030 + 0.06, times


def test_default_sizes_read_ten_classes():
    for kind in ("oscillators", "shg", "plate", "circuit", "cavity"):
        spec = BUILTIN[kind]().spec
        assert spec.n_outputs >= 10, (kind, spec.n_outputs)
    assert BUILTIN["shg"]().spec.n_inputs + BUILTIN["shg"]().spec.n_params == 64
    assert BUILTIN["cavity"]().spec.n_params == 0


def test_constructors_do_no_io(tmp_path):
    build_system({"kind": "recorded", "path": str(tmp_path / "absent.csv"), **RECORDED_LAYOUT,
                  "input_range": (0, 1)})  # the file is only read on connect
    build_system({"kind": "instrument", "port": 1})  # nothing listens there; nothing is dialled


# -- physics sanity ---------------------------------------------------------------------------------
def test_shg_open_shaper_peaks_at_one_and_chirp_lowers_the_sh():
    d = build_system({"kind": "shg", "noise": 0})
    ideal = d.ideal_model()
    ones_x, ones_t = torch.ones(1, 48), torch.ones(16)
    assert abs(float(ideal(ones_x, ones_t).max()) - 1.0) < 1e-3
    assert float(d.forward(ones_x, ones_t).max()) < 0.8  # residual chirp spreads and weakens the SH
    half = ideal(0.5 * ones_x, 0.5 * ones_t)  # the SH goes as the fundamental power squared
    assert abs(float(half.max()) - 1 / 16) < 2e-3


def test_plate_small_drive_is_quadratic_and_step_converged():
    d = build_system({"kind": "plate", "n_inputs": 16, "n_params": 8, "noise": 0, "mismatch": 0})
    model = d.ideal_model()
    x, theta = inputs(d.spec, 4, seed=9)
    # Linear regime (tanh and the cubic term negligible): the mean square signal scales as drive^2.
    ratio = model(0.02 * x, 0.02 * theta) / model(0.01 * x, 0.01 * theta)
    assert torch.allclose(ratio, torch.full_like(ratio, 4.0), rtol=2e-3)
    fine = build_system({"kind": "plate", "n_inputs": 16, "n_params": 8, "noise": 0, "mismatch": 0,
                         "substeps": 40}).ideal_model()
    err = (model(x, theta) - fine(x, theta)).norm() / fine(x, theta).norm()
    assert float(err) < 0.02


def test_circuit_diode_clips_one_side_and_step_converged():
    cfg = {"kind": "circuit", "n_inputs": 16, "n_params": 8, "n_outputs": 24, "noise": 0, "mismatch": 0,
           "adc_bits": None}
    v = build_system(cfg).ideal_model()
    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.rand(64, 16, generator=gen) - 1
    theta = 2 * torch.rand(8, generator=gen) - 1
    y = v(x, theta)
    assert float(y.max()) < 1.1  # the diode clamps the node near 0.9 V
    assert float(y.min()) < -1.0  # reverse-biased: the resonance swings freely below
    fine = build_system({**cfg, "substeps": 64}).ideal_model()(x, theta)
    assert float((y - fine).pow(2).mean().sqrt()) < 0.05  # volts


def test_cavity_speckle_statistics_and_phase_quantisation():
    d = build_system({"kind": "cavity", "noise": 0, "mismatch": 0})
    x, theta = inputs(d.spec, 512, seed=1)
    y = d.forward(x, theta)
    assert abs(float(y.mean()) - 1.5) < 0.15  # <|T e^{i phi}|^2> + <|E0|^2> = 1 + 0.5
    q = build_system({"kind": "cavity", "noise": 0, "mismatch": 0, "phase_bits": 1})
    a, b = torch.full((1, 64), 0.3), torch.full((1, 64), 0.45)
    assert torch.equal(q.forward(a, theta), q.forward(b, theta))  # both are the 0 phase state
    assert not math.isclose(float(q.forward(a, theta).sum()), float(q.forward(1 - a, theta).sum()))
