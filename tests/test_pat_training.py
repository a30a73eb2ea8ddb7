"""PAT training: deep and hybrid PNNs, the envelope, resumable state (twin included)."""
from __future__ import annotations

import pytest
import torch

from actors.systems.oscillators import Oscillators
from farm.data import DataConfig, load_dataset
from trainers.config import PATConfig
from trainers.pat import train_pat
from trainers.registry import method


# 16-oscillator devices see the 8x8 digits pooled to 4x4 (tiling would cut 48 of the 64 pixels)
DOWN = {"kind": "downsample", "size": [4, 4]}


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(kind="digits", limit=300))


@pytest.mark.parametrize("hybrid", [False, True])
def test_deep_and_hybrid_pnns_train_and_theta_stays_in_the_envelope(digits, hybrid):
    device = Oscillators(n=16, seed=0)
    lo, hi = device.spec.param_range
    # a large learning rate drives theta into the envelope's walls
    cfg = PATConfig(epochs=3, batch_size=32, lr=0.3, n_layers=2, hybrid=hybrid, theta_init_scale=0.9,
                    encoder=DOWN)
    seen = []
    r = train_pat(cfg, device, digits, report=lambda m, s: seen.append(s["model"]))
    for state in seen:
        for name in ("layers.0.theta", "layers.1.theta"):
            theta = state[name]
            assert lo <= float(theta.min()) and float(theta.max()) <= hi
    assert any(float(s["layers.0.theta"].abs().max()) == hi for s in seen)  # projection was needed
    assert {"theta_0", "theta_1"} <= set(r.params)
    assert any(k.startswith("mixers") for k in seen[-1]) == hybrid
    assert r.history[-1]["device_calls"] >= 2 * 7  # both layers measured on the device


@pytest.mark.parametrize("hybrid", [False, True])
def test_deep_networks_learn(digits, hybrid):
    device = Oscillators(n=16, seed=0)
    r = train_pat(PATConfig(epochs=4, batch_size=16, lr=0.05, n_layers=2, hybrid=hybrid, encoder=DOWN),
                  device, digits)
    assert r.test_accuracy > 0.3  # chance is 0.1


def test_hybrid_network_starts_as_the_pnn(digits):
    from trainers.networks import PNN

    device = Oscillators(n=16, seed=0, noise=0.0)
    twin = device.ideal_model()
    a = PNN(device, twin, 64, 10, n_layers=2, generator=torch.Generator().manual_seed(0), encoder=DOWN,
            image_shape=(8, 8))
    b = PNN(device, twin, 64, 10, n_layers=2, generator=torch.Generator().manual_seed(0), hybrid=True,
            encoder=DOWN, image_shape=(8, 8))
    x = digits.x_test[:8]
    assert torch.allclose(a(x), b(x))


def test_resume_from_state_gives_identical_results(digits):
    twin = {"kind": "calibrated", "samples": 256, "thetas": 8, "steps": 20, "cache": False, "refresh_every": 2}
    cfg = PATConfig(epochs=3, batch_size=32, twin=twin, encoder=DOWN)
    straight = train_pat(cfg, Oscillators(n=16, seed=0, noise=0.0), digits)

    states = []

    class Killed(Exception):
        pass

    def report_then_die(metrics, state):  # the training is killed after its first checkpoint
        states.append(state)
        raise Killed

    first_device = Oscillators(n=16, seed=0, noise=0.0)
    with pytest.raises(Killed):
        train_pat(cfg, first_device, digits, report=report_then_die)
    saved = torch.load(_roundtrip(states[-1]), weights_only=False)  # as a checkpoint would
    assert saved["twins"][0]["twin"]["kind"] == "calibrated" and "state_dict" in saved["twins"][0]["twin"]
    resumed_device = Oscillators(n=16, seed=0, noise=0.0)
    resumed = train_pat(cfg, resumed_device, digits, state=saved)

    assert resumed.history == straight.history or _same_history(resumed.history, straight.history)
    assert resumed_device.calls == sum(m["device_calls"] for m in resumed.history[1:])  # no twin refit at start
    for k, v in straight.state["model"].items():
        assert torch.equal(v, resumed.state["model"][k]), k
    for k, v in straight.state["twins"][0]["twin"]["state_dict"].items():
        assert torch.equal(v, resumed.state["twins"][0]["twin"]["state_dict"][k]), k


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def _same_history(a, b):
    drop = {"epoch_s"}
    return [{k: v for k, v in m.items() if k not in drop} for m in a] == \
           [{k: v for k, v in m.items() if k not in drop} for m in b]


def test_methods_are_registered_and_validate():
    assert method("insilico").config_class.model_validate({"method": "insilico", "twin": "mlp"}).twin.kind == "mlp"
    assert method("digital").config_class.model_validate({"method": "digital"}).hidden is None
    with pytest.raises(ValueError, match="kind"):
        PATConfig.model_validate({"twin": {"kind": "oracle"}})
    with pytest.raises(ValueError, match="thetas"):
        PATConfig.model_validate({"twin": {"samples": 16, "thetas": 32}})


def test_data_init_gives_constant_channels_a_typical_gain_not_1_over_zero(digits):
    """Found by the L6 bench: through a noiseless twin with theta = 0 the always-blank pixels of
    digits stay constant, and 1/std gains (clamped at 1e-6) reached 5e5, wrecking in-silico training."""
    from trainers.networks import PNN, channel_spread

    device = Oscillators(n=64, seed=0, mismatch=0.0, noise=0.0)
    net = PNN(device, device.ideal_model(), n_features=64, n_classes=10, n_layers=2, theta_init_scale=0.0,
              generator=torch.Generator().manual_seed(0))
    x = digits.x_train[:64]
    assert int((x.std(0) == 0).sum()) > 0  # the batch has constant pixels
    net.data_init(x)
    scale = net.rescale[1].scale.detach()
    typical = float(scale.median())
    assert float(scale.max()) <= 100 * typical, (float(scale.max()), typical)
    assert torch.isfinite(net.readout.scale).all() and float(net.readout.scale.max()) < 1e3
    # a channel that does vary keeps its own spread
    h = torch.stack([torch.zeros(8), torch.arange(8.0), 2 * torch.arange(8.0)], dim=1)
    spread = channel_spread(h)
    assert spread[1] == pytest.approx(float(h[:, 1].std())) and spread[2] == pytest.approx(float(h[:, 2].std()))
    assert spread[0] == pytest.approx(float(h[:, 1:].std(0).median()))
