"""The `PhysicalSystem` contract as an importable test suite: point it at your own system class.

    # tests/test_my_device.py in your lab's package
    from actors.systems.registry import build_system
    from actors.testing import SystemContract

    class TestSpectrometer(SystemContract):
        def make(self, **knobs):          # knobs: seed, mismatch, noise, drift, fault_rate, latencies
            return build_system({"kind": "mylab.devices:Spectrometer", **knobs})

Run it with pytest: every check below runs against your system. Class attributes switch off what a
system cannot do (`drifts = False` for a replayed fit, `mismatched = False` for a device that has no
separate nominal model). physfarm's own systems are held to the same functions
(tests/test_systems_contract.py). Each check is also a plain function, `check_*(make)`.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pytest
import torch

from .errors import DeviceError, EnvelopeError
from .protocol import PhysicalSystem

Make = Callable[..., object]


def inputs(spec, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """rows inputs and one theta, uniform over the safe envelope (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    (xl, xh), (pl, ph) = spec.input_range, spec.param_range
    x = xl + (xh - xl) * torch.rand(rows, spec.n_inputs, generator=gen)
    theta = pl + (ph - pl) * torch.rand(spec.n_params, generator=gen)
    return x, theta


def scale_of(y: torch.Tensor) -> float:
    return max(1e-3, float(y.abs().max()))


def check_shapes_and_dtypes(make: Make, min_outputs: int = 10) -> None:
    """forward(x[B, n_inputs], theta[n_params] or [B, n_params]) -> float32 y[B, n_outputs], finite."""
    d = make(seed=0)
    assert isinstance(d, PhysicalSystem), "not a PhysicalSystem (spec, forward, ideal_model, connect, close)"
    spec = d.spec
    assert spec.n_outputs >= min_outputs, f"{spec.n_outputs} outputs: a PNN reads one per class"
    x, theta = inputs(spec, 5)
    y = d.forward(x, theta)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    assert y.shape == (5, spec.n_outputs) and torch.isfinite(y).all()
    y_rows = d.forward(x.numpy().astype(np.float64), theta.expand(5, -1).contiguous())  # per-row theta, numpy x
    assert y_rows.shape == (5, spec.n_outputs) and y_rows.dtype == torch.float32


def check_envelope_and_nonfinite_refused(make: Make) -> None:
    """Anything outside the safe envelope, non-finite or misshapen is refused, naming it; a refusal
    leaves the device usable."""
    d = make(seed=0)
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
    assert torch.isfinite(d.forward(x, theta)).all()


def check_seeded_determinism(make: Make, drifts: bool = True) -> None:
    """The same seed gives the same measurements (noise and drift included); another seed does not."""
    drift = 1.0 if drifts else 0.0
    a, b = make(seed=7, drift=drift), make(seed=7, drift=drift)
    x, theta = inputs(a.spec, 6, seed=1)
    for _ in range(3):
        assert torch.equal(a.forward(x, theta), b.forward(x, theta))
    c = make(seed=8, drift=drift)
    assert not torch.equal(make(seed=7, drift=drift).forward(x, theta), c.forward(x, theta))


def check_rows_are_independent_without_noise(make: Make) -> None:
    """Rows of one call (each with its own theta) are measured as if alone: requests of several
    trials can share a call."""
    d = make(seed=0, noise=0.0)
    spec = d.spec
    x, _ = inputs(spec, 8, seed=2)
    gen = torch.Generator().manual_seed(3)
    pl, ph = spec.param_range
    thetas = pl + (ph - pl) * torch.rand(8, spec.n_params, generator=gen)
    y = d.forward(x, thetas)
    tol = 1e-5 * scale_of(y)
    for i in (0, 3, 7):
        alone = d.forward(x[i : i + 1], thetas[i])
        assert torch.allclose(y[i], alone[0], rtol=1e-5, atol=tol), (i, (y[i] - alone[0]).abs().max())


def check_ideal_model(make: Make, mismatched: bool = True) -> None:
    """ideal_model() is a differentiable torch module equal to the device with mismatch, noise and
    drift off; with mismatch on, the device differs from it."""
    d = make(seed=5, mismatch=0.0, noise=0.0, drift=0.0)
    x, theta = inputs(d.spec, 6, seed=4)
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
    if mismatched:
        mism = make(seed=5, noise=0.0)
        assert not torch.allclose(mism.forward(x, theta), mism.ideal_model()(x, theta).detach(), atol=1e-6)


def check_drift_moves_outputs_over_calls(make: Make) -> None:
    """With drift on, the same request measures differently after some calls; with drift off it does
    not (noise off)."""
    x = theta = None
    for drift, should_move in ((0.0, False), (10.0, True)):
        d = make(seed=2, noise=0.0, drift=drift)
        if x is None:
            x, theta = inputs(d.spec, 4, seed=5)
        first = d.forward(x, theta)
        for _ in range(40):
            d.forward(x[:1], theta)
        moved = float((d.forward(x, theta) - first).abs().max())
        if should_move:
            assert moved > 1e-4 * scale_of(first), moved
        else:
            assert moved == 0.0, moved


def check_fault_rate_honoured(make: Make) -> None:
    """fault_rate: that fraction of calls raise DeviceError (a transient fault the client retries)."""
    d = make(seed=11, fault_rate=0.3)
    x, theta = inputs(d.spec, 1)
    faults = 0
    for _ in range(200):
        try:
            d.forward(x, theta)
        except DeviceError:
            faults += 1
    assert 30 <= faults <= 90, faults  # 60 expected; binomial std 6.5
    assert torch.isfinite(make(seed=11).forward(x, theta)).all()


def check_latency_honoured(make: Make) -> None:
    """latency_call_s + rows * latency_row_s is really spent per call (and not much more).

    "Not much more" is judged against the same system without latency, timed alternately with it: on
    a loaded machine (a test suite on 2 cores, a server thread in this process) a call's own cost can
    grow tenfold, and it grows for both alike."""
    d = make(seed=0, latency_call_s=0.02, latency_row_s=0.001)
    base = make(seed=0)
    x, theta = inputs(d.spec, 10)
    d.forward(x, theta)  # warm-up (connects, fits)
    base.forward(x, theta)
    times, base_times = [], []
    for _ in range(5):
        for system, out in ((d, times), (base, base_times)):
            t0 = time.perf_counter()
            system.forward(x, theta)
            out.append(time.perf_counter() - t0)
    assert min(times) >= 0.030 - 0.001, times  # 0.02 s + 10 rows x 0.001 s, in seconds
    assert min(times) - min(base_times) <= 0.030 + 0.03, (times, base_times)


class SystemContract:
    """Subclass as `Test<YourSystem>` and implement `make(**knobs)` returning a new system; pytest
    then runs every check of the contract against it."""

    min_outputs = 10  # a PNN reads one output per class
    drifts = True  # False for a system without drift (e.g. a replayed fit)
    mismatched = True  # False where the device has no nominal model apart from itself
    faults = True  # honours fault_rate
    latency = True  # honours latency_call_s / latency_row_s

    def make(self, **knobs):
        raise NotImplementedError("implement make(**knobs) -> your system (knobs: seed, mismatch, noise, drift, "
                                  "fault_rate, latency_call_s, latency_row_s)")

    def test_shapes_and_dtypes(self):
        check_shapes_and_dtypes(self.make, self.min_outputs)

    def test_envelope_and_nonfinite_refused(self):
        check_envelope_and_nonfinite_refused(self.make)

    def test_seeded_determinism(self):
        check_seeded_determinism(self.make, self.drifts)

    def test_rows_are_independent_without_noise(self):
        check_rows_are_independent_without_noise(self.make)

    def test_ideal_model(self):
        check_ideal_model(self.make, self.mismatched)

    def test_drift(self):
        if not self.drifts:
            pytest.skip("this system declares no drift (SystemContract.drifts = False)")
        check_drift_moves_outputs_over_calls(self.make)

    def test_fault_rate(self):
        if not self.faults:
            pytest.skip("this system declares no fault injection (SystemContract.faults = False)")
        check_fault_rate_honoured(self.make)

    def test_latency(self):
        if not self.latency:
            pytest.skip("this system declares no latency knobs (SystemContract.latency = False)")
        check_latency_honoured(self.make)
