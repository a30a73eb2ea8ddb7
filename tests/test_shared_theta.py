"""The device actor's shared-theta path: a device call whose requests all carry one theta passes it
once, as theta[n_params], to systems that accept that (the simulators); every other system, and any
call merging different thetas, gets theta[rows, n_params] as the protocol documents, unless the system
says a call is cheaper split by theta (`splits_by_theta`: the oscillators): then each run of rows
sharing a theta is measured with that theta, within the one device call. The oscillators'
shared-theta physics equals its per-row physics (values and gradients).
"""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict

import actors.device_actor
import actors.systems.base
from actors.device_actor import DeviceActor
from actors.errors import EnvelopeError
from actors.spec import SystemSpec
from actors.systems.oscillators import Oscillators, OscillatorsModel
from actors.theta_rows import accepts_shared_theta


class ShapeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    max_rows: int = 64


class PerRowSystem:
    """A user system written for the documented contract: it indexes theta per row (theta[:, 0]) and
    records the theta shape of every call. y = [x, theta[:, 0]]."""

    config_class = ShapeConfig

    def __init__(self, config: ShapeConfig):
        self.config = config
        self.theta_shapes: list[tuple[int, ...]] = []
        self._lock = threading.Lock()

    @property
    def spec(self) -> SystemSpec:
        return SystemSpec(name="rows", n_inputs=2, n_params=3, n_outputs=3, input_range=(-10.0, 10.0),
                          param_range=(-10.0, 10.0), max_rows=self.config.max_rows)

    def connect(self) -> None:
        pass

    def forward(self, x, theta) -> torch.Tensor:
        with self._lock:
            self.theta_shapes.append(tuple(theta.shape))
        theta = theta.expand(x.shape[0], -1) if theta.ndim == 1 else theta
        return torch.cat([x, theta[:, :1]], dim=1)


class SharedSystem(PerRowSystem):
    """The same device, declaring that it broadcasts a theta[n_params] itself."""

    accepts_shared_theta = True


class SplitSystem(SharedSystem):
    """... and that a call mixing thetas is cheaper measured one theta at a time."""

    splits_by_theta = True


def _serve(kind: str, requests: list[tuple[np.ndarray, np.ndarray, str]], max_wait_s: float = 0.0):
    actor = DeviceActor({"kind": f"{__name__}:{kind}"}, name="shape#0", max_wait_s=max_wait_s)

    async def main():
        actor.connect()
        return await asyncio.gather(*(asyncio.wrap_future(actor.submit(x, t, c)) for x, t, c in requests))

    try:
        ys = asyncio.run(main())
    finally:
        actor.close()
    return actor._system, ys


def _req(client: int, rows: int, theta_value: float):
    x = np.stack([np.full(rows, client, np.float32), np.arange(rows, dtype=np.float32)], axis=1)
    return x, np.full(3, theta_value, np.float32), f"c{client}"


def test_which_systems_accept_a_shared_theta():
    assert accepts_shared_theta(Oscillators(n=4))  # a simulator: its forward broadcasts theta
    assert not accepts_shared_theta(PerRowSystem(ShapeConfig(kind="x")))  # the documented default
    assert accepts_shared_theta(SharedSystem(ShapeConfig(kind="x")))


def test_per_row_system_always_gets_one_theta_row_per_sample():
    system, ys = _serve("PerRowSystem", [_req(0, 5, 0.5)])
    assert system.theta_shapes == [(5, 3)]
    np.testing.assert_array_equal(ys[0][:, 2], np.full(5, 0.5, np.float32))


def test_shared_system_gets_theta_once_when_the_call_shares_it():
    # two requests of one client with equal (not identical) theta arrays, merged into one call
    reqs = [_req(0, 4, 0.25), _req(0, 3, 0.25)]
    system, ys = _serve("SharedSystem", reqs, max_wait_s=0.05)
    assert system.theta_shapes == [(3,)], system.theta_shapes  # one call, theta[n_params]
    for (x, t, _), y in zip(reqs, ys):
        np.testing.assert_array_equal(y[:, :2], x)
        np.testing.assert_array_equal(y[:, 2], np.full(len(x), t[0]))


def test_shared_system_gets_per_row_theta_when_a_call_merges_different_thetas():
    reqs = [_req(0, 4, 0.25), _req(1, 3, -0.75)]
    system, ys = _serve("SharedSystem", reqs, max_wait_s=0.05)
    assert system.theta_shapes == [(7, 3)], system.theta_shapes  # merged: one row per sample
    for (x, t, _), y in zip(reqs, ys):
        np.testing.assert_array_equal(y[:, :2], x)  # each client gets its own rows
        np.testing.assert_array_equal(y[:, 2], np.full(len(x), t[0]))  # computed with its own theta


def test_a_system_that_splits_by_theta_gets_each_requests_theta_within_one_call():
    reqs = [_req(0, 4, 0.25), _req(1, 3, -0.75), _req(2, 2, -0.75)]
    actor = DeviceActor({"kind": f"{__name__}:SplitSystem"}, name="shape#0", max_wait_s=0.05)

    async def main():
        actor.connect()
        return await asyncio.gather(*(asyncio.wrap_future(actor.submit(x, t, c)) for x, t, c in reqs))

    try:
        ys = asyncio.run(main())
        stats = actor.stats()
    finally:
        actor.close()
    # one device call (one slot, one audit line), measured as two runs: 4 rows at 0.25, 5 rows at -0.75
    assert stats["calls"] == 1 and stats["rows"] == 9
    assert actor._system.theta_shapes == [(3,), (3,)], actor._system.theta_shapes
    for (x, t, _), y in zip(reqs, ys):
        np.testing.assert_array_equal(y[:, :2], x)
        np.testing.assert_array_equal(y[:, 2], np.full(len(x), t[0]))


def test_oscillators_merged_call_of_several_thetas_equals_each_alone():
    """The oscillators split a merged call by theta: noise-free, each request measures what it
    measures alone in-process (so merging trials' requests changes no trial's numbers)."""
    cfg = {"kind": "oscillators", "n": 6, "noise": 0.0, "seed": 3}
    assert Oscillators.splits_by_theta
    rng = np.random.default_rng(2)
    reqs = [(rng.uniform(-1, 1, (5, 6)).astype(np.float32), rng.uniform(-2, 2, 42).astype(np.float32), f"c{i}")
            for i in range(3)]
    actor = DeviceActor(cfg, name="osc#0", max_wait_s=0.05)

    async def main():
        actor.connect()
        return await asyncio.gather(*(asyncio.wrap_future(actor.submit(x, t, c)) for x, t, c in reqs))

    try:
        ys = asyncio.run(main())
        calls = actor.stats()["calls"]
    finally:
        actor.close()
    assert calls < len(reqs)  # merged into fewer device calls than requests
    local = Oscillators(cfg)
    for (x, t, _), y in zip(reqs, ys):
        np.testing.assert_allclose(y, local.forward(x, t).numpy(), rtol=0, atol=1e-5)


def test_oscillators_shared_theta_equals_per_row_physics():
    gen = torch.Generator().manual_seed(0)
    n, rows = 6, 5
    model = OscillatorsModel(n, n, 0.1, 5, eta=0.1, coupling_error=0.05 * torch.randn(n, n, generator=gen))
    x = 2 * torch.rand(rows, n, generator=gen) - 1
    theta = 4 * torch.rand(n * n + n, generator=gen) - 2
    w = torch.randn(rows, n, generator=gen)
    t_shared = theta.clone().requires_grad_(True)
    t_rows = theta.clone().requires_grad_(True)
    y_shared = model(x, t_shared)
    y_rows = model(x, t_rows.expand(rows, -1).contiguous())  # materialised: the per-row path
    torch.testing.assert_close(y_shared, y_rows, rtol=0, atol=1e-5)
    assert float((y_shared.detach() - x).abs().max()) > 1e-2  # the dynamics moved q: the check has teeth
    g_shared = torch.autograd.grad((y_shared * w).sum(), t_shared)[0]
    g_rows = torch.autograd.grad((y_rows * w).sum(), t_rows)[0]
    torch.testing.assert_close(g_shared, g_rows, rtol=0, atol=1e-5)


def test_oscillators_device_through_the_actor_equals_in_process():
    """Noise-free oscillators served by the actor (shared theta) measure what the in-process
    simulator measures with a materialised per-row theta."""
    cfg = {"kind": "oscillators", "n": 6, "noise": 0.0, "seed": 3}
    actor = DeviceActor(cfg, name="osc#0")
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (9, 6)).astype(np.float32)
    theta = rng.uniform(-2, 2, 42).astype(np.float32)
    try:
        y = actor.forward(x, theta, "c")
    finally:
        actor.close()
    ref = Oscillators(cfg).forward(x, np.ascontiguousarray(np.broadcast_to(theta, (9, 42)))).numpy()
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)


def test_the_actor_checks_a_request_once_and_the_local_path_still_checks(monkeypatch):
    """On the actor path the envelope is checked once, on arrival (the simulator is called through
    `forward_checked`); a simulator called directly still checks every request itself."""
    checks = []

    def count_checks(module):
        real = module.check_request

        def check(*args, **kwargs):
            checks.append(module.__name__)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "check_request", check)

    count_checks(actors.device_actor)
    count_checks(actors.systems.base)
    cfg = {"kind": "oscillators", "n": 4, "noise": 0.0}
    x, theta = np.full((3, 4), 0.1, np.float32), np.zeros(20, np.float32)
    actor = DeviceActor(cfg, name="osc#0")
    try:
        served = actor.forward(x, theta, "c")
    finally:
        actor.close()
    assert checks == ["actors.device_actor"]
    checks.clear()
    local = Oscillators(cfg)
    np.testing.assert_array_equal(local.forward(x, theta).numpy(), served)
    assert checks == ["actors.systems.base"]
    with pytest.raises(EnvelopeError, match=r"theta value 2\.5 at index \[0\] is outside the parameter range"):
        local.forward(x, np.full(20, 2.5, np.float32))
