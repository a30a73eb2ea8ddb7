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

from actors.systems.registry import BUILTIN, build_system
from actors.testing import (SystemContract, check_drift_moves_outputs_over_calls, check_envelope_and_nonfinite_refused,
                            check_fault_rate_honoured, check_ideal_model, check_latency_honoured,
                            check_rows_are_independent_without_noise, check_seeded_determinism,
                            check_shapes_and_dtypes, inputs)

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
                   "input_range": (0.0, 1.0), "param_range": (0.0, 1.0), "steps": 1000, **knobs}
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


def _bound(make, name: str):
    return lambda **knobs: make(name, **knobs)


@pytest.mark.parametrize("name", SYSTEMS)
def test_shapes_and_dtypes(make, name):
    check_shapes_and_dtypes(_bound(make, name))


@pytest.mark.parametrize("name", SYSTEMS)
def test_envelope_and_nonfinite_refused(make, name):
    check_envelope_and_nonfinite_refused(_bound(make, name))


@pytest.mark.parametrize("name", SYSTEMS)
def test_seeded_determinism(make, name):
    check_seeded_determinism(_bound(make, name), drifts=name not in NO_DRIFT)


@pytest.mark.parametrize("name", SYSTEMS)
def test_rows_are_independent_without_noise(make, name):
    check_rows_are_independent_without_noise(_bound(make, name))


@pytest.mark.parametrize("name", SYSTEMS)
def test_ideal_model_equals_clean_device_and_is_differentiable(make, name):
    # an instrument serves the device, a recorded fit is its own model: neither differs from it
    check_ideal_model(_bound(make, name), mismatched=name not in ("instrument", "recorded"))


@pytest.mark.parametrize("name", [s for s in SYSTEMS if s not in NO_DRIFT])
def test_drift_moves_outputs_over_calls(make, name):
    check_drift_moves_outputs_over_calls(_bound(make, name))


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
    check_fault_rate_honoured(_bound(make, name))


@pytest.mark.parametrize("name", SYSTEMS)
def test_latency_honoured(make, name):
    check_latency_honoured(_bound(make, name))


class TestTheShippedSuiteOnAUserSystem(SystemContract):
    """actors.testing's suite as a lab would use it, on the third-party example system."""

    def make(self, **knobs):
        return build_system({"kind": "mylab.devices:Spectrometer", **knobs})


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
