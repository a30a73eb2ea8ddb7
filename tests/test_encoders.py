"""Input encoders: shapes, values and gradients of each; nothing is cut silently; PAT through a
patches encoder gives autograd's gradients when the device equals its twin (oracle)."""
from __future__ import annotations

import pytest
import torch

import trainers.layers as layers_module
from actors.systems.oscillators import Oscillators
from trainers.encoders import EncoderError, build_encoder
from trainers.networks import PNN


def _images(b: int, h: int, w: int) -> torch.Tensor:
    return torch.arange(b * h * w, dtype=torch.float32).reshape(b, h * w) / (b * h * w)


def test_tile_and_pad():
    x = torch.tensor([[0.1, 0.2, 0.3]])
    assert torch.equal(build_encoder("tile", 3, 7)(x), torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1]]))
    assert torch.equal(build_encoder({"kind": "pad", "value": 0.5}, 3, 5)(x),
                       torch.tensor([[0.1, 0.2, 0.3, 0.5, 0.5]]))
    for kind in ("tile", "pad"):
        with pytest.raises(EncoderError, match="3 features but device 'd' has 2 inputs: they would be cut off"):
            build_encoder(kind, 3, 2, device="d")


def test_no_encoder_refuses_more_features_than_inputs_with_the_fix():
    with pytest.raises(EncoderError) as err:
        build_encoder(None, 64, 16, (8, 8), "osc")
    assert "Choose train.encoder: downsample" in str(err.value) and "n_inputs >= 64" in str(err.value)


def test_downsample_average_and_stride():
    x = _images(2, 8, 8)
    img = x.reshape(2, 8, 8)
    avg = build_encoder({"kind": "downsample", "size": [4, 4]}, 64, 16, (8, 8))(x)
    assert avg.shape == (2, 16)
    assert torch.allclose(avg[0, 0], img[0, :2, :2].mean())
    stride = build_encoder({"kind": "downsample", "size": [4, 4], "mode": "stride"}, 64, 20, (8, 8))(x)
    assert stride.shape == (2, 20)  # 16 pixels, padded with zeros up to the device's 20 inputs
    assert torch.equal(stride[0, :16], img[0, ::2, ::2].reshape(-1)) and torch.all(stride[:, 16:] == 0)
    with pytest.raises(EncoderError, match="gives 64 features but device"):
        build_encoder({"kind": "downsample", "size": [8, 8]}, 64, 16, (8, 8))
    with pytest.raises(EncoderError, match="needs images"):
        build_encoder({"kind": "downsample", "size": [2, 2]}, 12, 16, None)


def test_patches_cut_the_image_row_major_and_pad():
    x = _images(2, 28, 28)
    enc = build_encoder({"kind": "patches", "patch": 7}, 784, 100, (28, 28))
    u = enc(x)
    assert enc.copies == 16 and u.shape == (2 * 16, 100)
    img = x.reshape(2, 28, 28)
    # sample 1, patch 6 = patch row 1, column 2
    assert torch.equal(u[16 + 6, :49], img[1, 7:14, 14:21].reshape(-1))
    assert torch.all(u[:, 49:] == 0)
    with pytest.raises(EncoderError, match="does not divide the 28x28 images; use one of"):
        build_encoder({"kind": "patches", "patch": 5}, 784, 100, (28, 28))
    with pytest.raises(EncoderError, match="patches of 196 features"):
        build_encoder({"kind": "patches", "patch": 14}, 784, 100, (28, 28))


def test_linear_is_trainable_and_starts_as_the_folded_mean():
    enc = build_encoder("linear", 64, 16)
    x = torch.rand(5, 64)
    y = enc(x)
    expected = torch.stack([x[:, torch.arange(64) % 16 == j].mean(dim=1) for j in range(16)], dim=1)
    assert torch.allclose(y, expected, atol=1e-6)
    y.sum().backward()
    assert enc.proj.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("spec", [{"kind": "downsample", "size": [4, 4]}, {"kind": "patches", "patch": 4},
                                  "linear", "pad"])
def test_gradients_reach_the_input_through_every_encoder(spec):
    n_inputs = 64 if spec == "pad" else 16
    enc = build_encoder(spec, 64, n_inputs, (8, 8))
    x = torch.rand(3, 64, requires_grad=True)
    enc(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_pnn_with_patches_shares_one_theta_over_the_copies():
    device = Oscillators(n=20, seed=0, noise=0.0)
    net = PNN(device, device.ideal_model(), 64, 10, encoder={"kind": "patches", "patch": 4}, image_shape=(8, 8),
              readout="last")
    assert net.encoder.copies == 4 and net.layers[0].theta.shape == (20 * 20 + 20,)
    out = net(torch.rand(3, 64))
    assert out.shape == (3, 10)
    assert net.readout_index.tolist() == list(range(70, 80))  # last 10 of the 4 x 20 outputs side by side
    counts = net.param_counts()
    assert counts["n_physical_params"] == 420 and counts["n_digital_params"] == 2 * 20 + 2 * 10


def test_pat_through_patches_and_two_devices_equals_autograd_when_device_is_the_twin(monkeypatch):
    """The L9 architecture in miniature: patches into a small device, zero-padded into a larger one,
    read out from its last outputs. With mismatch and noise off, PAT's gradients (forward on the
    device, backward through the twin) equal plain autograd through the same physics."""
    small = Oscillators(n=18, seed=0, mismatch=0.0, noise=0.0)  # 4x4 patches padded to 18
    large = Oscillators(n=80, seed=1, mismatch=0.0, noise=0.0)  # 4 x 18 outputs padded to 80

    def build():
        return PNN([small, large], [small.ideal_model(), large.ideal_model()], 64, 5, n_layers=2,
                   theta_init_scale=[0.3, 0.1], encoder={"kind": "patches", "patch": 4}, image_shape=(8, 8),
                   connects=["tile", "pad"], readout="last", readout_scale=1.0,
                   generator=torch.Generator().manual_seed(0))

    x = torch.rand(7, 64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(7) % 5

    def grads(net):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        return dict(zip([n for n, _ in net.named_parameters()],
                        torch.autograd.grad(loss, list(net.parameters()))))

    pat = grads(build())
    with monkeypatch.context() as m:  # the layers call the twin directly: autograd end to end
        m.setattr(layers_module, "pat_apply", lambda xx, theta, device, twin: twin(xx, theta))
        ref = grads(build())
    assert set(pat) == set(ref)
    for name in pat:
        assert (pat[name] - ref[name]).abs().max() < 1e-6, name
    assert pat["layers.0.theta"].abs().max() > 1e-4 and pat["layers.1.theta"].abs().max() > 1e-4
