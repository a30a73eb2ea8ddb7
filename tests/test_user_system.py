"""A lab's own device, the worked example of docs/devices.md (examples/mylab/devices.py):
selectable by import-path kind through the registry, trained with PAT, and served by a DeviceActor.

The full contract suite also runs on it: tests/test_systems_contract.py, parameter id `mylab`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.errors import DeviceError, EnvelopeError
from actors.protocol import PhysicalSystem
from actors.systems.registry import build_system, validate_system_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Users put their module's folder on PYTHONPATH (or pip install it); the test does the same.
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

KIND = "mylab.devices:Spectrometer"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_import_path_kind_builds_through_the_registry():
    cfg = validate_system_config({"kind": KIND, "n_bins": 12, "seed": 4})
    assert type(cfg).__name__ == "SpectrometerConfig" and cfg.n_bins == 12
    d = build_system({"kind": KIND})
    assert isinstance(d, PhysicalSystem)
    assert d._dev is None  # the constructor did no I/O; the vendor handle opens on connect/forward
    spec = d.spec
    assert (spec.n_inputs, spec.n_params, spec.n_outputs) == (8, 4, 16)
    y = d.forward(torch.rand(3, 8), torch.rand(4))
    assert y.shape == (3, 16) and y.dtype == torch.float32
    with pytest.raises(EnvelopeError, match="x value .* outside the input range"):
        d.forward(torch.full((1, 8), 1.5), torch.rand(4))
    with pytest.raises(ValueError, match="cannot import module 'mylab.nope'.*PYTHONPATH"):
        build_system({"kind": "mylab.nope:Spectrometer"})


def test_vendor_errors_become_device_errors():
    d = build_system({"kind": KIND, "fault_rate": 1.0})
    with pytest.raises(DeviceError, match="spectrometer ACME-0001: .*USB timeout"):
        d.forward(torch.rand(2, 8), torch.rand(4))


def test_pat_trains_on_the_user_device():
    from farm.data import DataConfig, load_dataset
    from trainers.config import PATConfig
    from trainers.pat import train_pat

    data = load_dataset(DataConfig(kind="digits", limit=120))
    device = build_system({"kind": KIND, "seed": 1})
    reports = []
    result = train_pat(PATConfig(epochs=2, batch_size=32, lr=0.05, encoder={"kind": "downsample", "size": [2, 4]}),
                       device, data,
                       report=lambda metrics, state: reports.append(metrics))
    assert result.epochs == 2 and len(reports) == 2
    assert all(np.isfinite(m["loss"]) for m in reports) and reports[-1]["device_calls"] > 0
    theta = result.params["theta_0"]
    assert theta.shape == (4,) and (theta >= 0).all() and (theta <= 1).all()  # stayed in the envelope
    assert 0.0 <= result.test_accuracy <= 1.0


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    # Ray workers import the user's module too: give them the same PYTHONPATH.
    path = os.pathsep.join([str(EXAMPLES)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def test_device_actor_serves_the_user_device(ray_local):
    from actors.device_actor import DeviceActor

    ray = ray_local
    actor = ray.remote(DeviceActor).options(num_cpus=0).remote({"kind": KIND, "noise": 0}, "spectro")
    x = np.random.default_rng(0).uniform(0, 1, (5, 8)).astype(np.float32)
    theta = np.full(4, 0.2, np.float32)
    y = ray.get(actor.forward.remote(x, theta, "test"))
    assert y.shape == (5, 16)
    local = build_system({"kind": KIND, "noise": 0}).forward(x, theta).numpy()
    np.testing.assert_allclose(y, local, rtol=1e-6)
    assert ray.get(actor.stats.remote())["rows"] == 5
    ray.kill(actor)
