"""The device actor on a real Ray: refusals, accounting, batching across clients; and, without Ray,
that constructing it does no I/O."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray
import torch
from pydantic import BaseModel, ConfigDict

from actors.device_actor import DeviceActor
from actors.errors import DeviceError, EnvelopeError
from actors.spec import SystemSpec
from farm.client import DeviceClient
from farm.config import DeviceConfig
from farm.pool import find_device, start_device, stop_device

N = 8
N_PARAMS = N * N + N


@pytest.fixture(scope="module")
def device(ray_session):
    handles = start_device(DeviceConfig(name="osc-test", system={"kind": "oscillators", "n": N, "seed": 0}))
    yield handles[0]
    stop_device("osc-test")


@pytest.fixture(scope="module")
def client(device):
    return DeviceClient("osc-test", client_id="tester").connect()


def _x(rows, value=0.5):
    return np.full((rows, N), value, dtype=np.float32)


def test_actor_is_named_and_reserves_no_cpu(device):
    assert find_device("osc-test") is not None
    # The device actor holds no CPU: both of the module's 2 CPUs stay free for trials.
    assert ray.available_resources().get("CPU", 0) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "x, theta, field, needle",
    [
        (_x(3, np.nan), np.zeros(N_PARAMS, np.float32), "x", "non-finite"),
        (_x(3, np.inf), np.zeros(N_PARAMS, np.float32), "x", "non-finite"),
        (_x(3, 1.5), np.zeros(N_PARAMS, np.float32), "x", "input range [-1.0, 1.0]"),
        (_x(3), np.full(N_PARAMS, 2.5, np.float32), "theta", "parameter range [-2.0, 2.0]"),
        (_x(3), np.full(N_PARAMS, -np.inf, np.float32), "theta", "non-finite"),
    ],
)
def test_refuses_bad_values_naming_device_field_and_range(client, x, theta, field, needle):
    with pytest.raises(EnvelopeError) as err:
        client.forward(x, theta)
    msg = str(err.value)
    assert "device 'osc-test#0'" in msg and f"{field} " in msg and needle in msg


def test_refuses_wrong_shapes(client):
    with pytest.raises(EnvelopeError, match=r"x must have shape \[rows, 8\]"):
        client.forward(np.zeros((3, N + 1), np.float32), np.zeros(N_PARAMS, np.float32))
    with pytest.raises(EnvelopeError, match=r"theta must have shape \[72\]"):
        client.forward(_x(3), np.zeros(N_PARAMS - 1, np.float32))


def test_refusals_never_reach_the_device_and_actor_stays_healthy(device, client):
    before = ray.get(device.stats.remote())
    with pytest.raises(EnvelopeError):
        client.forward(_x(2, np.nan), np.zeros(N_PARAMS, np.float32))
    after = ray.get(device.stats.remote())
    assert after["calls"] == before["calls"] and after["refused"] == before["refused"] + 1
    assert ray.get(device.ping.remote()) == "pong"
    y = client.forward(_x(2), np.zeros(N_PARAMS, np.float32))
    assert y.shape == (2, N)


def test_counts_calls_rows_and_busy_time(device, client):
    ray.get(device.reset_stats.remote())
    for rows in (5, 7, 11):
        client.forward(_x(rows, 0.1), np.zeros(N_PARAMS, np.float32))
    stats = ray.get(device.stats.remote())
    assert stats["calls"] == 3 and stats["rows"] == 23 and stats["requests"] == 3
    assert stats["busy_s"] > 0 and 0 < stats["utilisation"] <= 1.0
    mine = stats["clients"]["tester"]
    assert mine["rows"] == 23 and mine["requests"] == 3 and mine["device_s"] == pytest.approx(stats["busy_s"])


def test_concurrent_clients_are_batched_and_get_exactly_their_rows(device):
    """Requests of many clients share device calls; each gets back its own rows, in order."""
    ray.get(device.reset_stats.remote())
    rng = np.random.default_rng(0)
    n_clients = 24
    xs = [rng.uniform(-1, 1, size=(int(rng.integers(1, 40)), N)).astype(np.float32) for _ in range(n_clients)]
    thetas = [rng.uniform(-0.5, 0.5, size=N_PARAMS).astype(np.float32) for _ in range(n_clients)]
    refs = [device.forward.remote(x, t, f"c{i}") for i, (x, t) in enumerate(zip(xs, thetas))]
    ys = ray.get(refs)
    stats = ray.get(device.stats.remote())
    assert stats["requests"] == n_clients and stats["rows"] == sum(len(x) for x in xs)
    assert stats["calls"] < n_clients  # merged into fewer device calls
    # Each answer is that client's own: compare with the same rows measured without noise, alone.
    from actors.systems.oscillators import Oscillators

    exact = Oscillators(n=N, seed=0, noise=0.0)
    for x, t, y in zip(xs, thetas, ys):
        assert y.shape == (len(x), N)
        assert np.abs(y - exact.forward(x, t).numpy()).max() < 0.2  # noise only (std 0.02 on q0)


def test_requests_larger_than_max_rows_are_split(ray_session):
    handles = start_device(DeviceConfig(name="small", system={"kind": "oscillators", "n": N, "max_rows": 16}))
    try:
        c = DeviceClient("small").connect()
        y = c.forward(_x(50), np.zeros(N_PARAMS, np.float32))
        assert y.shape == (50, N)
        assert ray.get(handles[0].stats.remote())["calls"] == 4  # 16 + 16 + 16 + 2
    finally:
        stop_device("small")


def test_device_fault_fails_the_request_with_a_device_error(ray_session):
    handles = start_device(DeviceConfig(name="faulty", system={"kind": "oscillators", "n": N, "fault_rate": 1.0}))
    try:
        c = DeviceClient("faulty", retries=0).connect()
        with pytest.raises(DeviceError, match="fault"):
            c.forward(_x(2), np.zeros(N_PARAMS, np.float32))
        assert ray.get(handles[0].stats.remote())["errors"] == 1
    finally:
        stop_device("faulty")


def test_client_of_a_missing_device_says_how_to_start_it(ray_session):
    with pytest.raises(DeviceError, match="'nope' is not running"):
        DeviceClient("nope").connect()


class LoggedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str


class LoggedSystem:
    """A device that logs every call made to it: y = x."""

    config_class = LoggedConfig

    def __init__(self, config: LoggedConfig):
        self.config = config
        self.log: list[str] = []

    @property
    def spec(self) -> SystemSpec:
        return SystemSpec(name="logged", n_inputs=3, n_params=1, n_outputs=3, input_range=(-1.0, 1.0),
                          param_range=(-1.0, 1.0))

    def connect(self) -> None:
        self.log.append("connect")

    def forward(self, x, theta) -> torch.Tensor:
        self.log.append("forward")
        return x

    def close(self) -> None:
        self.log.append("close")


def test_constructing_the_actor_does_no_io_until_used():
    """No device thread and no call to the system (not even connect) until the first request; the
    cheap methods start nothing either. (In-process, without Ray: the same code the actor runs.)"""
    actor = DeviceActor({"kind": f"{__name__}:LoggedSystem"}, name="quiet#0")

    def device_threads():
        return [t for t in threading.enumerate() if t.name == "device-quiet#0"]

    try:
        assert actor._system.log == [] and device_threads() == []
        assert actor.ping() == "pong" and actor.spec()["name"] == "logged"
        assert actor.stats()["calls"] == 0 and actor.load() == {"queued_rows": 0, "busy": False, "leased": False}
        assert actor.lease_info() is None
        assert actor._system.log == [] and device_threads() == []
        y = actor.forward(np.full((2, 3), 0.5, np.float32), np.zeros(1, np.float32), "c")
        np.testing.assert_array_equal(y, np.full((2, 3), 0.5, np.float32))
        assert actor._system.log == ["connect", "forward"] and len(device_threads()) == 1
    finally:
        actor.close()
    assert actor._system.log[-1] == "close" and device_threads() == []


def test_a_request_given_up_by_its_client_is_dropped_from_the_queue(ray_session):
    """A client timeout cancels its Ray call; the threaded actor notices (Ray only flags the task) and
    the request, still queued behind a slow call, is never served."""
    from actors.errors import DeviceTimeoutError

    handles = start_device(DeviceConfig(name="slowq", system={"kind": "oscillators", "n": N, "latency_call_s": 1.5}))
    try:
        ray.get(handles[0].connect.remote())
        first = handles[0].forward.remote(_x(2), np.zeros(N_PARAMS, np.float32), "first")  # on the device 1.5 s
        impatient = DeviceClient("slowq", client_id="impatient", retries=0, timeout_s=0.3).connect()
        with pytest.raises(DeviceTimeoutError):
            impatient.forward(_x(3), np.zeros(N_PARAMS, np.float32))
        assert ray.get(first).shape == (2, N)
        time.sleep(2.0)  # longer than a call: a served impatient request would have been counted by now
        stats = ray.get(handles[0].stats.remote())
        assert stats["calls"] == 1 and stats["queued_requests"] == 0
        assert "impatient" not in stats["clients"] or stats["clients"]["impatient"]["rows"] == 0
    finally:
        stop_device("slowq")
