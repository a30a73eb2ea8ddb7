"""PAT's backward pass is the twin's VJP: with device == twin it must equal plain autograd (L7)."""
from __future__ import annotations

import pytest
import torch

from actors.systems.oscillators import Oscillators
from trainers.pat_function import pat_apply


def _exact_device(**kw):
    return Oscillators(seed=3, mismatch=0.0, noise=0.0, **kw)


@pytest.mark.parametrize("n,rows", [(8, 5), (16, 32)])
def test_pat_gradients_equal_autograd_when_device_equals_twin(n, rows):
    device = _exact_device(n=n)
    twin = device.ideal_model()
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(rows, n, generator=gen) * 2 - 1).requires_grad_(True)
    theta = (torch.rand(device.spec.n_params, generator=gen) * 2 - 1).mul(0.5).requires_grad_(True)
    w = torch.randn(rows, n, generator=gen)  # a random upstream gradient

    y_pat = pat_apply(x, theta, device, twin)
    gx_pat, gt_pat = torch.autograd.grad((y_pat * w).sum(), [x, theta])

    y_ref = twin(x, theta)
    gx_ref, gt_ref = torch.autograd.grad((y_ref * w).sum(), [x, theta])

    assert torch.equal(y_pat, y_ref.detach())  # forward: the device measured exactly the twin
    assert (gx_pat - gx_ref).abs().max() < 1e-6
    assert (gt_pat - gt_ref).abs().max() < 1e-6
    assert gt_ref.abs().max() > 1e-3  # the oracle compares real, non-zero gradients


def test_pat_forward_is_the_device_and_backward_the_twin():
    """With mismatch, forward values come from the device, gradients from the twin at the same point."""
    device = Oscillators(n=8, seed=1, noise=0.0)  # mismatched device, no noise
    twin = device.ideal_model()
    x = torch.full((4, 8), 0.3, requires_grad=True)
    theta = torch.full((device.spec.n_params,), 0.1, requires_grad=True)
    y = pat_apply(x, theta, device, twin)
    assert torch.allclose(y, device.forward(x.detach(), theta.detach()))
    assert not torch.allclose(y, twin(x, theta).detach(), atol=1e-4)  # the mismatch is real
    (gx,) = torch.autograd.grad(y.sum(), [x])
    (gx_twin,) = torch.autograd.grad(twin(x, theta).sum(), [x])
    assert torch.allclose(gx, gx_twin)


def test_device_equals_ideal_model_without_mismatch_and_noise():
    device = _exact_device(n=16)
    x = torch.rand(10, 16) * 2 - 1
    theta = torch.rand(device.spec.n_params) * 4 - 2
    assert torch.equal(device.forward(x, theta), device.ideal_model()(x, theta))


def test_mismatch_and_noise_are_seeded():
    x = torch.rand(6, 16) * 2 - 1
    theta = torch.rand(16 * 16 + 16) - 0.5
    a, b, c = Oscillators(n=16, seed=5), Oscillators(n=16, seed=5), Oscillators(n=16, seed=6)
    ya, yb, yc = a.forward(x, theta), b.forward(x, theta), c.forward(x, theta)
    assert torch.equal(ya, yb)
    assert not torch.allclose(ya, yc)
    assert not torch.equal(a.forward(x, theta), ya)  # noise: a second measurement differs
