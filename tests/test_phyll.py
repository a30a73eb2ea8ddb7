"""PhyLL (physical local learning): pieces on hand-computed cases, no gradient to the device, the
per-epoch measurement cache, learning on small problems, resume, and every available system."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from actors.systems.oscillators import Oscillators
from actors.systems.registry import BUILTIN
from farm.data import DataConfig, load_dataset
from trainers.phyll import (PhyLLConfig, embed_labels, goodness, hybrid_negatives, phyll_loss,
                            train_phyll, wrong_labels)
from trainers.registry import method
from trainers.types import Dataset


def _toy(n_train=40, n_test=12, n_features=6, n_classes=3, seed=0, n_val=None) -> Dataset:
    """Separable toy data: class c has high values on feature group c."""
    gen = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.arange(n) % n_classes
        x = 0.2 * torch.rand(n, n_features, generator=gen)
        for c in range(n_classes):
            x[y == c, c * (n_features // n_classes):(c + 1) * (n_features // n_classes)] += 0.7
        return x.clamp(0, 1), y

    x_tr, y_tr = make(n_train)
    x_va, y_va = make(n_test if n_val is None else n_val)
    x_te, y_te = make(n_test)
    return Dataset("toy", x_tr, y_tr, x_va, y_va, x_te, y_te, n_classes)


class GuardedDevice:
    """Asserts that nothing the device sees can carry a gradient, and counts calls."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    @property
    def spec(self):
        return self.inner.spec

    def forward(self, x, theta):
        assert not x.requires_grad and not theta.requires_grad, "a gradient path reached the device"
        assert x.grad_fn is None and theta.grad_fn is None
        assert not torch.is_grad_enabled(), "device called with autograd recording"
        self.calls += 1
        return self.inner.forward(x, theta)


# ---- pieces -----------------------------------------------------------------------------------------
def test_label_embedding_replaces_first_entries_with_scaled_one_hot():
    x = torch.tensor([[0.1, 0.2, 0.3, 0.8, 0.5],
                      [0.9, 0.0, 0.0, 0.4, 0.2],
                      [0.0, 0.0, 0.0, 0.0, 0.0]])
    out = embed_labels(x, torch.tensor([2, 0, 1]), n_classes=3)
    expected = torch.tensor([[0.0, 0.0, 0.8, 0.8, 0.5],   # one-hot at 2, scaled to the row max 0.8
                             [0.9, 0.0, 0.0, 0.4, 0.2],   # the max (0.9) sat in the label area
                             [0.0, 1.0, 0.0, 0.0, 0.0]])  # an all-zero row uses 1
    assert torch.equal(out, expected)
    assert torch.equal(x[0], torch.tensor([0.1, 0.2, 0.3, 0.8, 0.5]))  # input untouched


def test_goodness_and_loss_on_hand_computed_values():
    r = torch.tensor([1.0, 0.0])
    z = torch.tensor([[3.0, -4.0], [-2.0, 0.0], [0.0, 5.0]])
    assert torch.allclose(goodness(z, r), torch.tensor([0.6, 1.0, 0.0]))
    r2 = torch.tensor([1.0, -1.0]) / math.sqrt(2)
    assert torch.allclose(goodness(torch.tensor([[1.0, 1.0]]), r2), torch.tensor([0.0]), atol=1e-7)
    g_pos, g_neg = torch.tensor([0.6, 0.2]), torch.tensor([0.1, 0.7])
    loss = phyll_loss(g_pos, g_neg, alpha=4.0)
    expected = (math.log1p(math.exp(-4 * 0.5)) + math.log1p(math.exp(4 * 0.5))) / 2
    assert abs(float(loss) - expected) < 1e-6


def test_wrong_labels_are_wrong_and_uniform():
    gen = torch.Generator().manual_seed(0)
    y = torch.zeros(30_000, dtype=torch.int64)
    neg = wrong_labels(y, 4, gen)
    assert (neg != y).all()
    counts = torch.bincount(neg, minlength=4).float() / len(y)
    assert counts[0] == 0 and torch.allclose(counts[1:], torch.full((3,), 1 / 3), atol=0.02)


def test_hybrid_negatives_mix_two_different_samples():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(5).float().unsqueeze(1).repeat(1, 8)  # row i holds the value i everywhere
    neg = hybrid_negatives(x, gen)
    for i in range(5):
        values = set(neg[i].tolist())
        assert i in values and len(values) == 2  # own half + another row's half
        assert (neg[i] == i).sum() == 4


def test_registered_as_a_method():
    m = method("phyll")
    cfg = m.config_class.model_validate({"method": "phyll", "n_blocks": 3, "inner_steps": 2})
    assert isinstance(cfg, PhyLLConfig) and m.train is train_phyll
    with pytest.raises(Exception, match="inner_steps"):
        PhyLLConfig(inner_steps=0)


def test_too_few_device_inputs_for_the_labels_is_a_clear_error():
    with pytest.raises(ValueError, match="needs at least 4"):
        train_phyll(PhyLLConfig(epochs=1), Oscillators(n=3), _toy())


# ---- the device: no gradients, one measurement per block per epoch --------------------------------------
@pytest.mark.parametrize("inner_steps", [1, 4])
def test_no_gradient_reaches_device_and_calls_per_epoch_are_cached(inner_steps):
    data = _toy()  # 40 train, 12 validation, 12 test, 3 classes
    device = GuardedDevice(Oscillators(n=8, seed=1))
    cfg = PhyLLConfig(epochs=2, n_blocks=2, batch_size=8, inner_steps=inner_steps, eval_batch_size=32,
                      train_eval_size=10, lr=0.01)
    seen = []
    train_phyll(cfg, device, data, report=lambda m, s: seen.append(m))
    rows_per_call = 32
    train_calls = 2 * math.ceil(2 * 40 / rows_per_call)  # blocks x (positives + negatives) / rows per call
    # per epoch, every block on 10 training samples and 12 validation samples, each with 3 candidate labels
    eval_calls = 2 * (math.ceil(10 * 3 / rows_per_call) + math.ceil(12 * 3 / rows_per_call))
    test_calls = 2 * math.ceil(12 * 3 / rows_per_call)  # once, after the last epoch
    for m in seen:
        assert m["device_calls_train"] == train_calls  # independent of inner_steps and batch size
        assert m["device_rows_train"] == 2 * 2 * 40
        assert m["device_calls"] == train_calls + eval_calls + (test_calls if m["epoch"] == 2 else 0)
        for key in ("epoch", "loss", "train_accuracy", "val_accuracy", "val_loss", "device_calls",
                    "device_rows", "epoch_s"):
            assert key in m
    assert "test_accuracy" not in seen[0] and "test_accuracy" in seen[1]
    assert device.calls == 2 * (train_calls + eval_calls) + test_calls


# ---- learning ---------------------------------------------------------------------------------------
def test_learns_vowels_on_oscillators(vowels_csv):
    data = load_dataset(DataConfig(kind="vowels", path=str(vowels_csv)))
    cfg = PhyLLConfig(epochs=6, n_blocks=2, batch_size=32, lr=0.01, train_eval_size=64)
    result = train_phyll(cfg, Oscillators(n=16, seed=0), data)
    assert result.test_accuracy >= 0.6, result.history  # chance is 1/7
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert {"blocks.0.linear.weight", "blocks.0.theta", "blocks.1.theta"} <= set(result.params)
    assert all(isinstance(v, np.ndarray) for v in result.params.values())


def test_learns_digits_subset_on_oscillators():
    data = load_dataset(DataConfig(kind="digits", limit=300))
    cfg = PhyLLConfig(epochs=4, n_blocks=1, batch_size=32, lr=0.01, train_eval_size=32, skip=True,
                      encoder={"kind": "downsample", "size": [4, 8]})  # 64 pixels pooled onto 32 inputs
    result = train_phyll(cfg, Oscillators(n=32, seed=0), data)
    assert result.test_accuracy >= 0.5, result.history  # chance is 1/10


def test_unsupervised_variant_beats_chance():
    data = _toy(n_train=90, n_test=30, n_features=12, n_classes=3)
    cfg = PhyLLConfig(epochs=4, n_blocks=2, batch_size=16, lr=0.01, unsupervised=True)
    device = GuardedDevice(Oscillators(n=16, seed=0))
    result = train_phyll(cfg, device, data)
    assert result.test_accuracy >= 0.8, result.history  # chance is 1/3
    assert "readout.weight" in result.params
    # unsupervised: 2 blocks x 180 rows in 256-row calls, then per block the 30 validation rows and,
    # after the last epoch, the 30 test rows
    assert result.history[-1]["device_calls_train"] == 2 and result.history[-1]["device_calls"] == 6


# ---- resume -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("unsupervised", [False, True])
def test_resume_from_state_equals_an_uninterrupted_run(unsupervised):
    data = _toy()

    def device():  # deterministic (noise off), so two runs measure the same values
        return Oscillators(n=8, seed=2, noise=0.0)

    cfg = PhyLLConfig(epochs=4, batch_size=8, inner_steps=2, train_eval_size=8, unsupervised=unsupervised)
    full = train_phyll(cfg, device(), data)

    states = {}
    train_phyll(cfg.model_copy(update={"epochs": 2}), device(), data,
                report=lambda m, s: states.__setitem__(m["epoch"], s))
    buf = io.BytesIO()
    torch.save(states[2], buf)  # the state is torch.save-able
    buf.seek(0)
    resumed = train_phyll(cfg, device(), data, state=torch.load(buf, weights_only=False))

    assert resumed.epochs == 4 and [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(full.history, resumed.history):
        assert a["loss"] == b["loss"] and a["val_accuracy"] == b["val_accuracy"]
    assert full.test_accuracy == resumed.test_accuracy and full.best_epoch == resumed.best_epoch
    for k, v in full.params.items():
        np.testing.assert_array_equal(v, resumed.params[k], err_msg=k)


# ---- every system -----------------------------------------------------------------------------------
def test_works_on_the_cavity():
    if "cavity" not in BUILTIN:
        pytest.skip("the cavity simulator (actors/systems/cavity.py) is not registered yet")
    device = GuardedDevice(BUILTIN["cavity"]())
    spec = device.spec
    data = _toy(n_features=min(12, spec.n_inputs))
    cfg = PhyLLConfig(epochs=3, batch_size=8, lr=0.02, train_eval_size=8)
    result = train_phyll(cfg, device, data)
    assert spec.n_params == 0 or result.params["blocks.0.theta"].shape == (spec.n_params,)
    assert result.test_accuracy >= 0.75, result.history  # chance is 1/3


@pytest.mark.parametrize("kind", sorted(k for k in BUILTIN if k not in ("cavity", "recorded", "instrument")))
def test_runs_on_every_simulator(kind):
    try:
        device = GuardedDevice(BUILTIN[kind]())
    except Exception as exc:  # a system that needs more than defaults (files, a server) is tested elsewhere
        pytest.skip(f"{kind} cannot be built from defaults: {exc}")
    if device.spec.n_inputs < 4:
        pytest.skip(f"{kind} has only {device.spec.n_inputs} inputs")
    data = _toy(n_train=12, n_test=6)
    result = train_phyll(PhyLLConfig(epochs=1, n_blocks=2, train_eval_size=4), device, data)
    assert 0.0 <= result.test_accuracy <= 1.0 and result.history[0]["device_calls_train"] >= 2
