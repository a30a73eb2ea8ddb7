"""Honest model selection: trainers choose the best validation epoch and read the test split once, at
the end. Poisoning the test split changes nothing but the final test figure; the confusion matrix
is that same final pass."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from actors.systems.cavity import Cavity
from actors.systems.oscillators import Oscillators
from farm.data import DataConfig, load_dataset
from farm.plots import confusion_counts
from trainers.baselines import train_digital
from trainers.config import DigitalConfig, InSilicoConfig, PATConfig
from trainers.pat import train_insilico, train_pat
from trainers.phyll import PhyLLConfig, train_phyll
from trainers.selection import Selection

DOWN = {"kind": "downsample", "size": [4, 4]}
TEST_KEYS = {"test_accuracy", "selected_epoch", "selected_val_accuracy", "epoch_s"}


def test_selection_keeps_the_best_validation_epoch():
    s = Selection()
    assert s.offer(1, 0.50, 1.0, {"w": torch.tensor(1.0)})
    assert s.offer(2, 0.60, 0.9, {"w": torch.tensor(2.0)})
    assert not s.offer(3, 0.55, 0.1, {"w": torch.tensor(3.0)})  # accuracy decides first
    assert s.offer(4, 0.60, 0.8, {"w": torch.tensor(4.0)})  # a tie goes to the lower loss
    assert not s.offer(5, 0.60, 0.8, {"w": torch.tensor(5.0)})  # a full tie keeps the earlier epoch
    assert s.best["epoch"] == 4 and float(s.best["weights"]["w"]) == 4.0
    restored = Selection(s.state())
    assert restored.metrics() == {"best_val_accuracy": 0.60, "best_epoch": 4}
    nan = Selection()
    nan.offer(1, 0.5, math.nan, {})
    assert nan.offer(2, 0.5, 0.3, {})  # a real loss beats an unknown one


def _poisoned(data):
    """The same data with the test split replaced by noise and wrong labels."""
    gen = torch.Generator().manual_seed(123)
    return dataclasses.replace(data, x_test=torch.rand(data.x_test.shape, generator=gen),
                               y_test=(data.y_test + 1) % data.n_classes)


def _drop(history):
    return [{k: v for k, v in m.items() if k not in TEST_KEYS} for m in history]


RUNS = {
    "pat": lambda data: train_pat(PATConfig(epochs=3, batch_size=32, lr=0.05, encoder=DOWN),
                                  Oscillators(n=16, seed=0), data),
    "insilico": lambda data: train_insilico(InSilicoConfig(epochs=2, batch_size=32, lr=0.05, encoder=DOWN),
                                            Oscillators(n=16, seed=0), data),
    "phyll": lambda data: train_phyll(PhyLLConfig(epochs=3, batch_size=32, lr=0.01, train_eval_size=32),
                                      Cavity(seed=0), data),
    "digital": lambda data: train_digital(DigitalConfig(epochs=3, batch_size=32, lr=0.02, hidden=16), None, data),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_no_trainer_reads_the_test_split_before_its_final_pass(name):
    data = load_dataset(DataConfig(kind="digits", limit=300))
    clean = RUNS[name](data)
    dirty = RUNS[name](_poisoned(data))
    # every epoch's training and validation figures, the selected epoch and the trained weights agree
    assert _drop(clean.history) == _drop(dirty.history)
    assert clean.best_epoch == dirty.best_epoch and clean.val_accuracy == dirty.val_accuracy
    for key, value in clean.params.items():
        np.testing.assert_array_equal(value, dirty.params[key], err_msg=key)
    # only the one final test figure differs, and it is reported with the last epoch only
    assert clean.test_accuracy != dirty.test_accuracy
    assert [("test_accuracy" in m) for m in clean.history] == [False] * (clean.epochs - 1) + [True]


@pytest.mark.parametrize("name", ["pat", "phyll"])
def test_confusion_matrix_is_the_final_test_pass(name):
    data = load_dataset(DataConfig(kind="digits", limit=300))
    result = RUNS[name](data)
    pred = result.state["test_predictions"].numpy()
    counts = confusion_counts(data.y_test.numpy(), pred, data.n_classes)
    assert np.trace(counts) / counts.sum() == pytest.approx(result.test_accuracy, abs=1e-7)
    last = result.history[-1]
    assert last["selected_epoch"] == result.best_epoch
    assert last["selected_val_accuracy"] == max(m["val_accuracy"] for m in result.history)


def test_final_test_off_never_opens_the_test_split():
    """Runs that choose settings (benches, sweeps' screening) measure validation only."""
    data = load_dataset(DataConfig(kind="digits", limit=300))
    device = Oscillators(n=16, seed=0)
    result = train_pat(PATConfig(epochs=2, batch_size=32, encoder=DOWN, final_test=False), device, data)
    assert all("test_accuracy" not in m for m in result.history) and math.isnan(result.test_accuracy)
    assert "test_predictions" not in result.state and result.best_epoch in (1, 2)
    assert device.calls == sum(m["device_calls"] for m in result.history)
