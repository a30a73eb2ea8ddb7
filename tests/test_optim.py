"""Oracle: physfarm's Adam and SGD (trainers/optim.py, written out so that no trial imports
torch._dynamo) update parameters exactly as torch.optim's do, and their states load both ways."""
from __future__ import annotations

import pytest
import torch

from trainers.optim import SGD, Adam, cosine_lr, make_optimizer


def _problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen)),
              torch.nn.Parameter(torch.randn(2, generator=gen))]  # the last gets no gradient: left alone
    data = [torch.randn(4, 5, generator=gen) for _ in range(30)]

    def loss(ps):
        return sum(((x @ ps[0]).tanh().sum(1) - ps[1][:4] ** 2).pow(2).mean() for x in data[:3])
    return params, data, loss


def _run(make, steps: int, seed: int = 0, lr_at=None):
    params, data, _ = _problem(seed)
    opt = make(params)
    for step in range(steps):
        x = data[step % len(data)]
        value = ((x @ params[0]).tanh().sum(1) - params[1][:4] ** 2).pow(2).mean()
        opt.zero_grad()
        value.backward()
        opt.step()
        if lr_at is not None:
            opt.param_groups[0]["lr"] = lr_at(step)
    return params, opt


@pytest.mark.parametrize("ours,theirs", [
    (lambda p: Adam(p, lr=0.03), lambda p: torch.optim.Adam(p, lr=0.03)),
    (lambda p: SGD(p, lr=0.01), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
    (lambda p: make_optimizer("adam", p, 0.1), lambda p: torch.optim.Adam(p, lr=0.1)),
], ids=["adam", "sgd-momentum", "make_optimizer"])
def test_the_same_parameters_as_torch_optim_after_many_steps(ours, theirs):
    schedule = lambda step: cosine_lr(0.05, 0.0025, step + 1, 200)  # noqa: E731 - lr changed between steps
    a, _ = _run(ours, 200, lr_at=schedule)
    b, _ = _run(theirs, 200, lr_at=schedule)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    assert not torch.equal(a[0], _problem(0)[0][0])  # it moved
    assert torch.equal(a[2], _problem(0)[0][2])  # no gradient, no update


@pytest.mark.parametrize("name,theirs", [("adam", lambda p, lr: torch.optim.Adam(p, lr=lr)),
                                         ("sgd", lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))])
def test_states_load_both_ways_and_training_goes_on_the_same(name, theirs):
    # 50 steps with torch's optimiser, its state into ours, 50 more: the same as 100 with torch's
    ref, _ = _run(lambda p: theirs(p, 0.02), 100)
    params, torch_opt = _run(lambda p: theirs(p, 0.02), 50)
    ours = make_optimizer(name, params, 0.5)  # the lr comes from the state
    ours.load_state_dict(torch_opt.state_dict())
    assert ours.param_groups[0]["lr"] == 0.02
    _, data, _ = _problem(0)
    for step in range(50, 100):
        x = data[step % len(data)]
        value = ((x @ params[0]).tanh().sum(1) - params[1][:4] ** 2).pow(2).mean()
        ours.zero_grad()
        value.backward()
        ours.step()
    for pa, pb in zip(params, ref):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    # and back: ours' state into torch's
    again = theirs([torch.nn.Parameter(p.detach().clone()) for p in params], 0.1)
    again.load_state_dict(ours.state_dict())
    assert again.param_groups[0]["lr"] == 0.02


def test_a_state_for_another_network_is_refused_with_the_reason():
    params, _, _ = _problem(0)
    opt = Adam(params[:2], lr=0.1)
    with pytest.raises(ValueError, match="does not fit this one .3 parameters"):
        Adam(params, lr=0.1).load_state_dict(opt.state_dict())


def test_no_trainer_step_imports_torch_dynamo():
    import subprocess
    import sys

    code = ("import sys, torch\nfrom trainers.optim import make_optimizer\n"
            "p = torch.nn.Parameter(torch.zeros(3)); o = make_optimizer('adam', [p], 0.1)\n"
            "p.sum().backward(); o.step(); o.zero_grad()\nprint('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
