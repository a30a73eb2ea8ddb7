"""The overlapped PAT call (device call in flight while the twin's forward runs) gives the same outputs
and gradients as the plain order (device, then the twin inside backward): for a local device, for a
real Ray device actor, and through a whole PNN; a device fault on an overlapped call fails (or is
retried) as before; evaluation (no grad) never runs the twin."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.errors import DeviceError
from actors.systems.oscillators import Oscillators
from trainers.inflight import Done, begin_forward
from trainers.metering import MeteredDevice
from trainers.pat_function import pat_apply

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 8
N_PARAMS = N * N + N


def _point(rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(rows, N, generator=gen) * 2 - 1).requires_grad_(True)
    theta = (torch.rand(N_PARAMS, generator=gen) - 0.5).requires_grad_(True)
    w = torch.randn(rows, N, generator=gen)  # a random upstream gradient
    return x, theta, w


def _outputs_and_grads(device, twin, overlap: bool, rows: int = 16):
    x, theta, w = _point(rows)
    y = pat_apply(x, theta, device, twin, overlap=overlap)
    gx, gt = torch.autograd.grad((y * w).sum(), [x, theta])
    return y.detach(), gx, gt


class _Counting(torch.nn.Module):
    """A twin that counts its forward passes."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x, theta):
        self.calls += 1
        return self.inner(x, theta)


def test_overlapped_equals_plain_on_a_local_device():
    # Two identical mismatched, noisy devices (same seed: the same noise draws, call for call).
    plain_dev, over_dev = (Oscillators(n=N, seed=4, noise=0.02) for _ in range(2))
    twin = plain_dev.ideal_model()
    y0, gx0, gt0 = _outputs_and_grads(plain_dev, twin, overlap=False)
    y1, gx1, gt1 = _outputs_and_grads(MeteredDevice(over_dev), twin, overlap=True)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1) and torch.equal(gt0, gt1)
    assert gt0.abs().max() > 1e-3  # real, non-zero gradients


def test_overlap_runs_the_twin_once_per_step_and_never_in_evaluation():
    device = Oscillators(n=N, seed=4, noise=0.0)
    twin = _Counting(device.ideal_model())
    x, theta, w = _point(4)
    y = pat_apply(x, theta, device, twin)
    assert twin.calls == 1  # in the forward, while the device call was in flight
    (y * w).sum().backward()
    assert twin.calls == 1  # the backward walked that graph, it did not run the twin again
    with torch.no_grad():
        pat_apply(x, theta, device, twin)
    assert twin.calls == 1


def test_a_second_backward_through_the_same_output_still_works():
    device = Oscillators(n=N, seed=4, noise=0.0)
    twin = device.ideal_model()
    x, theta, w = _point(4)
    y = pat_apply(x, theta, device, twin)
    g1 = torch.autograd.grad((y * w).sum(), [theta], retain_graph=True)[0]
    g2 = torch.autograd.grad((y * w).sum(), [theta])[0]
    assert torch.equal(g1, g2)


def test_the_twin_runs_while_the_device_call_is_in_flight():
    """The order of the overlap: the call is sent, the twin's forward runs, then the answer is collected."""
    events = []
    exact = Oscillators(n=N, seed=4, noise=0.0)

    class Pending:
        def __init__(self, y):
            self._y = y

        def result(self):
            events.append("collect")
            return self._y

        def cancel(self):
            events.append("cancel")

    class Device:
        spec = exact.spec

        def submit(self, x, theta):
            events.append("send")
            return Pending(exact.forward(x, theta))

    class Twin(torch.nn.Module):
        def forward(self, x, theta):
            events.append("twin")
            return exact.ideal_model()(x, theta)

    x, theta, w = _point(4)
    y = pat_apply(x, theta, Device(), Twin())
    (y * w).sum().backward()
    assert events == ["send", "twin", "collect"]


def test_begin_forward_calls_a_device_without_submit_at_once():
    device = Oscillators(n=N, seed=4, noise=0.0)
    x = torch.zeros(2, N)
    theta = torch.zeros(N_PARAMS)
    pending = begin_forward(device, x, theta)
    assert isinstance(pending, Done) and torch.equal(pending.result(), device.forward(x, theta))


def test_a_twin_that_raises_gives_up_the_call_in_flight():
    class Failing(torch.nn.Module):
        def forward(self, x, theta):
            raise RuntimeError("twin broke")

    cancelled = []

    class Pending:
        def result(self):
            raise AssertionError("not collected after the twin failed")

        def cancel(self):
            cancelled.append(True)

    class Device:
        spec = None

        def submit(self, x, theta):
            return Pending()

    x, theta, _ = _point(2)
    with pytest.raises(RuntimeError, match="twin broke"):
        pat_apply(x, theta, Device(), Failing())
    assert cancelled == [True]


# -- through a real device actor -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def actor_device(ray_session):
    from farm.config import DeviceConfig
    from farm.pool import start_device, stop_device

    # Mismatched, noise-free: every call with the same request measures the same y.
    handles = start_device(DeviceConfig(name="overlap-osc", system={"kind": "oscillators", "n": N, "seed": 4,
                                                                    "noise": 0.0}))
    yield handles
    stop_device("overlap-osc")


def test_overlapped_equals_plain_through_a_device_actor(actor_device):
    from farm.client import DeviceClient

    client = DeviceClient("overlap-osc", client_id="overlap").connect()
    twin = Oscillators(n=N, seed=4, noise=0.0).ideal_model()
    y0, gx0, gt0 = _outputs_and_grads(client, twin, overlap=False)
    y1, gx1, gt1 = _outputs_and_grads(client, twin, overlap=True)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1) and torch.equal(gt0, gt1)
    # ... and both measured the device (its mismatch), not the twin.
    local = Oscillators(n=N, seed=4, noise=0.0)
    x, theta, _ = _point(16)
    assert torch.allclose(y1, local.forward(x.detach(), theta.detach()), atol=1e-5)
    assert client.client_stats()["requests"] == 2


def test_pnn_training_through_an_actor_is_the_same_overlapped_or_plain(ray_session, monkeypatch):
    """A whole PAT run (digits, two epochs) gives the same history with the overlap as without it."""
    from farm.client import DeviceClient
    from farm.config import DeviceConfig
    from farm.data import DataConfig, load_dataset
    from farm.pool import start_device, stop_device
    from trainers import layers as layers_module
    from trainers.config import PATConfig
    from trainers.pat import train_pat

    data = load_dataset(DataConfig(kind="digits"))
    config = PATConfig.model_validate({"method": "pat", "epochs": 2, "batch_size": 64, "lr": 0.02, "seed": 0,
                                       "torch_threads": 1})
    # The oscillators at their default size (64 inputs: the digits' 8x8 pixels), noise-free.
    handles = start_device(DeviceConfig(name="overlap-pnn", system={"kind": "oscillators", "seed": 0,  # noqa: F841
                                                                    "noise": 0.0}))
    try:
        client = DeviceClient("overlap-pnn", client_id="overlap-pnn").connect()
        overlapped = train_pat(config, client, data).history
        plain_apply = layers_module.pat_apply
        monkeypatch.setattr(layers_module, "pat_apply",
                            lambda x, theta, device, twin: plain_apply(x, theta, device, twin, overlap=False))
        plain = train_pat(config, client, data).history
    finally:
        stop_device("overlap-pnn")
    assert [h["val_loss"] for h in overlapped] == [h["val_loss"] for h in plain]
    assert [h["val_accuracy"] for h in overlapped] == [h["val_accuracy"] for h in plain]


def test_a_device_fault_on_an_overlapped_call_fails_or_is_retried_as_before(ray_session):
    from farm.client import DeviceClient
    from farm.config import DeviceConfig
    from farm.pool import start_device, stop_device

    handles = start_device(DeviceConfig(name="overlap-faulty", system={"kind": "oscillators", "n": N,
                                                                        "fault_rate": 1.0}))
    try:
        twin = Oscillators(n=N, seed=0).ideal_model()
        x, theta, _ = _point(2)
        client = DeviceClient("overlap-faulty", retries=0).connect()
        with pytest.raises(DeviceError, match="fault"):
            pat_apply(x, theta, client, twin)
        retried = DeviceClient("overlap-faulty", retries=2, backoff_s=0.01).connect()
        with pytest.raises(DeviceError, match=r"retries=2"):
            pat_apply(x, theta, retried, twin)
        assert retried.retried == 2
        import ray

        assert ray.get(handles[0].stats.remote())["errors"] == 4  # 1 + (1 + 2 retries)
    finally:
        stop_device("overlap-faulty")


def test_submit_on_an_in_process_device_actor_is_a_future():
    """The in-process actor offers the same protocol (a concurrent Future), so begin_forward uses it."""
    from actors.device_actor import DeviceActor

    actor = DeviceActor({"kind": "oscillators", "n": N, "seed": 4, "noise": 0.0}, name="inproc#0")
    try:
        x = np.full((3, N), 0.25, np.float32)
        theta = np.zeros(N_PARAMS, np.float32)
        y = begin_forward(actor, x, theta).result(timeout=30)
        assert np.allclose(y, Oscillators(n=N, seed=4, noise=0.0).forward(torch.from_numpy(x),
                                                                           torch.from_numpy(theta)).numpy(),
                           atol=1e-6)
    finally:
        actor.close()
