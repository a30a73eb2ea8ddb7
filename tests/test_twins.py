"""Digital twins: fitting, calibration, the cache, refresh under drift (tiny sizes, local simulators)."""
from __future__ import annotations

import pytest
import torch

from actors.systems.oscillators import Oscillators
from farm.data import DataConfig, load_dataset
from trainers.config import PATConfig, TwinConfig
from trainers.pat import train_pat
from trainers.twins import build_twin, collect, obtain_twin, sample_thetas, twin_error

# 16-oscillator devices see the 8x8 digits pooled to 4x4
DOWN = {"kind": "downsample", "size": [4, 4]}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Counting:
    """A device wrapper that counts calls and can shift its outputs (a sudden drift), exposing no
    system config (so the twin cache only knows it by name, spec and nominal model)."""

    def __init__(self, inner, name="dev"):
        self.inner_device = inner
        self.name = name
        self.calls = 0
        self.shift = 0.0

    @property
    def spec(self):
        return self.inner_device.spec

    def ideal_model(self):
        return self.inner_device.ideal_model()

    def forward(self, x, theta):
        self.calls += 1
        return self.inner_device.forward(x, theta) + self.shift


def _held_out(device, n_thetas=6, rows=64, seed=123):
    gen = torch.Generator().manual_seed(seed)
    return collect(device, sample_thetas(device.spec, n_thetas, gen), rows, gen)


def test_mlp_twin_fit_brings_held_out_error_below_bound():
    device = Oscillators(n=4, seed=0)
    cfg = TwinConfig(kind="mlp", samples=2048, thetas=128, steps=400, hidden=64, lr=0.01, cache=False)
    got = obtain_twin(device, cfg)
    info = got.twin.info
    assert got.calls == 128 and info["rows"] == 2048
    assert info["error"] < 0.25 < info["error_before"]  # fitting did the work
    # and on data it never saw (fresh parameter vectors, fresh noise)
    assert twin_error(got.twin, _held_out(device)) < 0.3


def test_calibrated_twin_recovers_a_known_mismatch():
    device = Oscillators(n=8, seed=2, noise=0.0)  # eta = 0.1 and a coupling error: the mismatch
    test = _held_out(device)
    ideal = build_twin(TwinConfig(kind="ideal"), device.spec, device.ideal_model)
    io_only = obtain_twin(device, TwinConfig(kind="calibrated", samples=512, thetas=16, steps=150, cache=False))
    physical = obtain_twin(device, TwinConfig(kind="calibrated", samples=512, thetas=16, steps=150, lr=0.02,
                                              calibrate=["eta", "coupling_error"], cache=False))
    e_ideal, e_io, e_phys = (twin_error(t, test) for t in (ideal, io_only.twin, physical.twin))
    assert e_phys < 0.2 * e_ideal and e_phys < e_io <= e_ideal * 1.01
    eta = physical.twin.model.ideal.eta
    assert isinstance(eta, torch.nn.Parameter) and abs(eta.item() - 0.1) < 0.02  # the constant, fitted


def test_unknown_calibration_buffer_is_refused_with_the_choices():
    device = Oscillators(n=4)
    with pytest.raises(ValueError, match="no buffer 'gamma'.*eta"):
        build_twin(TwinConfig(kind="calibrated", calibrate=["gamma"]), device.spec, device.ideal_model)


def test_cache_reuses_the_twin_without_measuring_again(tmp_path):
    cfg = TwinConfig(kind="calibrated", samples=256, thetas=8, steps=20, cache_dir=str(tmp_path))
    first_dev = Oscillators(n=4, seed=1)
    first = obtain_twin(first_dev, cfg)
    assert first.calls == 8 and not first.cached and first_dev.calls == 8
    again_dev = Oscillators(n=4, seed=1)  # the same device (same config), e.g. another trial
    again = obtain_twin(again_dev, cfg)
    assert again.cached and again.calls == 0 and again_dev.calls == 0
    for (k, a), (_, b) in zip(first.twin.state_dict().items(), again.twin.state_dict().items()):
        assert torch.equal(a, b), k
    other = Oscillators(n=4, seed=2)  # a different device: its own twin
    assert not obtain_twin(other, cfg).cached and other.calls == 8
    bigger = Oscillators(n=4, seed=1)  # more data: another twin
    assert not obtain_twin(bigger, cfg.model_copy(update={"samples": 512})).cached

    # through the trainer: the second training's device calls are its training and evaluation only
    data = load_dataset(DataConfig(kind="digits", limit=100))
    pat = PATConfig(epochs=1, batch_size=50, twin=cfg, encoder=DOWN)
    r1 = train_pat(pat, Oscillators(n=16, seed=1), data)
    dev2 = Oscillators(n=16, seed=1)
    r2 = train_pat(pat.model_copy(update={"seed": 1}), dev2, data)
    assert r1.history[0]["twin_fit_calls"] == 8 and "twin_fit_calls" not in r2.history[0]
    assert dev2.calls == r2.history[0]["device_calls"] and r2.history[0]["twin_calls_total"] == 0
    assert r2.history[0]["twin_error"] == r1.history[0]["twin_error"]


def test_cache_hit_is_verified_when_the_device_is_known_only_by_name(tmp_path):
    cfg = TwinConfig(kind="calibrated", samples=256, thetas=8, steps=20, cache_dir=str(tmp_path))
    dev = Counting(Oscillators(n=4, seed=1))
    assert not obtain_twin(dev, cfg).cached and dev.calls == 8
    again = Counting(Oscillators(n=4, seed=1))
    got = obtain_twin(again, cfg)
    assert got.cached and 0 < again.calls < 8  # a small probe checked it
    impostor = Counting(Oscillators(n=4, seed=1))  # same name and spec, but not the same device now
    impostor.shift = 0.5
    assert not obtain_twin(impostor, cfg).cached  # the probe disagreed: refitted


def _refresh_run(shift: float):
    device = Counting(Oscillators(n=16, seed=0, noise=0.0))
    data = load_dataset(DataConfig(kind="digits", limit=200))
    twin = TwinConfig(kind="calibrated", samples=256, thetas=8, steps=60, lr=0.02, cache=False,
                      refresh_ratio=3.0, refresh_samples=128)

    def report(metrics, state):
        if metrics["epoch"] == 2:
            device.shift = shift  # the device drifts after epoch 2

    cfg = PATConfig(epochs=4, batch_size=32, lr=0.02, twin=twin, encoder=DOWN)
    return train_pat(cfg, device, data, report=report)


def test_refresh_triggers_under_drift_and_not_without():
    drifting = _refresh_run(0.3)
    steady = _refresh_run(0.0)
    h = drifting.history
    assert [m["twin_refreshed"] for m in h] == [0, 0, 1, 0]  # the probe of epoch 3 saw the drift
    assert h[-1]["twin_refreshes_total"] == 1 and h[2]["twin_probe_error"] > 3 * h[0]["twin_probe_error"]
    assert h[3]["twin_probe_error"] < 0.5 * h[2]["twin_probe_error"]  # the refitted twin follows the device
    assert h[2]["device_calls"] > steady.history[2]["device_calls"]  # the refit measured fresh data
    assert all(m["twin_refreshed"] == 0 for m in steady.history)
    assert steady.history[-1]["twin_refreshes_total"] == 0
    assert drifting.state["twins"][0]["twin"]["info"]["refreshes"] == 1  # the refreshed twin is what is saved


def test_scheduled_refresh_every_k_epochs():
    device = Oscillators(n=16, seed=0)
    data = load_dataset(DataConfig(kind="digits", limit=100))
    twin = TwinConfig(kind="calibrated", samples=128, thetas=4, steps=10, cache=False, refresh_every=2)
    r = train_pat(PATConfig(epochs=4, batch_size=50, twin=twin, encoder=DOWN), device, data)
    assert [m["twin_refreshed"] for m in r.history] == [0, 1, 0, 1]


def test_twin_keeper_constructor_does_no_io(tmp_path):
    """Constructing the keeper measures nothing; obtain() fits (and counts those calls)."""
    from trainers.config import TwinConfig
    from trainers.twin_keeper import TwinKeeper

    device = Counting(Oscillators(n=4, seed=1))
    keeper = TwinKeeper(TwinConfig(kind="calibrated", samples=64, thetas=4, steps=5, cache_dir=str(tmp_path)),
                        device)
    assert device.calls == 0 and keeper.twin is None
    keeper.obtain()
    assert device.calls > 0 and keeper.calls == device.calls and keeper.twin is not None
