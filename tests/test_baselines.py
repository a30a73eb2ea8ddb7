"""Baselines: in-silico training (twin only, evaluated on the device) and a digital MLP."""
from __future__ import annotations

import pytest

from actors.systems.oscillators import Oscillators
from farm.data import DataConfig, load_dataset
from trainers.baselines import digital_hidden, pnn_param_count, train_digital
from trainers.config import DigitalConfig, InSilicoConfig, PATConfig
from trainers.pat import train_insilico, train_pat


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(kind="digits", limit=300))


def test_insilico_and_pat_both_report_accuracy_on_the_mismatched_device(digits):
    kw = dict(epochs=2, batch_size=32, lr=0.05, encoder={"kind": "downsample", "size": [4, 4]})
    pat_dev, sil_dev = Oscillators(n=16, seed=0), Oscillators(n=16, seed=0)
    pat = train_pat(PATConfig(**kw), pat_dev, digits)
    sil = train_insilico(InSilicoConfig(**kw), sil_dev, digits)
    n_val, n_test = len(digits.y_val), len(digits.y_test)
    for r in (pat, sil):
        assert 0.0 <= r.test_accuracy <= 1.0 and r.epochs == 2
    last = sil.history[-1]
    assert {"val_accuracy", "val_accuracy_twin", "test_accuracy"} <= set(last)
    # in-silico training never asked the device during training: only validation rows every epoch,
    # and the test rows once, in the last epoch's final pass
    assert [m["device_rows"] for m in sil.history] == [n_val, n_val + n_test]
    assert sil_dev.calls == sum(m["device_calls"] for m in sil.history)
    assert pat.history[-1]["device_rows"] > n_val + n_test
    assert sil.test_accuracy == last["test_accuracy"]


def test_digital_baseline_runs_and_matches_the_pnn_parameter_count(digits):
    device = Oscillators(n=32, seed=0)
    r = train_digital(DigitalConfig(epochs=15, lr=0.02, batch_size=32), device, digits)
    target = pnn_param_count(device.spec, 10)
    n_weights = r.history[-1]["n_weights"]
    assert abs(n_weights - target) / target < 0.15
    assert r.test_accuracy > 0.5 and r.history[-1]["device_calls"] == 0 and device.calls == 0
    assert train_digital(DigitalConfig(epochs=1, hidden=8), None, digits).history[0]["hidden"] == 8
    assert digital_hidden(10_000, 64, 10, 1) == 133
