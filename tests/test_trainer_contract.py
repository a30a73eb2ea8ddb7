"""The trainer contract (trainers/registry.py), held against every registered method: one report per
epoch with a full checkpoint, an interrupted training resumed from its checkpoint equals the
uninterrupted one, a checkpoint predicts what the final test pass predicted, device calls are all
accounted, and a mutated config's learning rates go into a checkpoint."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from actors.systems.oscillators import Oscillators
from trainers.registry import METHODS, config_of, method, predict_from_state, retune_state
from trainers.types import Dataset

STATE_KEYS = {"model", "optimizers", "generator", "history", "epoch", "selection", "config"}
CONFIGS = {  # small and quick, two epochs each; "<method>+<variant>": a mode of a method, held to it too
    "pat": {"epochs": 2, "batch_size": 16, "lr": 0.05},
    "insilico": {"epochs": 2, "batch_size": 16, "lr": 0.05},
    "phyll": {"epochs": 2, "batch_size": 16, "lr": 0.01, "train_eval_size": 8},
    "phyll+in_silico": {"epochs": 2, "batch_size": 16, "lr": 0.01, "train_eval_size": 8, "in_silico": True},
    "digital": {"epochs": 2, "batch_size": 16, "lr": 0.02, "hidden": 8},
}


class Counting:
    """A device that counts its calls (noise off, so measuring twice gives the same values)."""

    def __init__(self):
        self.inner = Oscillators(n=16, seed=3, noise=0.0)
        self.calls = 0

    @property
    def spec(self):
        return self.inner.spec

    def forward(self, x, theta):
        self.calls += 1
        return self.inner.forward(x, theta)

    def ideal_model(self):
        return self.inner.ideal_model()


def _data() -> Dataset:
    gen = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.arange(n) % 3
        x = 0.2 * torch.rand(n, 12, generator=gen)
        for c in range(3):
            x[y == c, 4 * c : 4 * c + 4] += 0.7
        return x.clamp(0, 1), y

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = make(48), make(15), make(15)
    return Dataset("toy", x_tr, y_tr, x_va, y_va, x_te, y_te, 3)


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _method(name: str):
    return method(name.split("+")[0])


def _cfg(name: str):
    return _method(name).config_class.model_validate({"method": name.split("+")[0], **CONFIGS[name]})


def test_every_method_is_held_to_the_contract():
    assert set(METHODS) == {n.split("+")[0] for n in CONFIGS}, \
        "a new method needs a row in CONFIGS (and must keep the contract)"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reports_a_full_checkpoint_each_epoch_and_accounts_every_device_call(name):
    m, cfg, data, device = _method(name), _cfg(name), _data(), Counting()
    seen = []
    result = m.train(cfg, device, data, report=lambda metrics, state: seen.append((metrics, _roundtrip(state))))
    assert [metrics["epoch"] for metrics, _ in seen] == [1, 2]
    for metrics, state in seen:
        assert STATE_KEYS <= set(state), set(state)
        assert state["epoch"] == metrics["epoch"] and state["history"][-1]["epoch"] == metrics["epoch"]
        # selected on the twin (in silico): the device's figure comes with the last epoch only
        best = "best_val_accuracy_twin" if "in_silico" in name and metrics["epoch"] < 2 else "best_val_accuracy"
        assert {"val_accuracy", "val_loss", best, "best_epoch"} <= set(metrics)
    assert config_of(seen[-1][1]) == cfg  # the resolved config travels in every checkpoint
    assert device.calls == sum(metrics["device_calls"] for metrics, _ in seen)  # twin, training, val, test
    assert (device.calls == 0) == (name == "digital")
    assert result.test_accuracy == seen[-1][0]["test_accuracy"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_resumed_training_equals_the_uninterrupted_one(name):
    m, cfg, data = _method(name), _cfg(name), _data()
    straight = m.train(cfg, Counting(), data)

    class Killed(Exception):
        pass

    saved = []

    def die_after_first(metrics, state):
        saved.append(_roundtrip(state))
        raise Killed

    with pytest.raises(Killed):
        m.train(cfg, Counting(), data, report=die_after_first)
    resumed = m.train(cfg, Counting(), data, state=saved[0])
    def same(h):  # NaN (in silico: no device validation before the last epoch) equals NaN here
        return {k: "nan" if v != v else v for k, v in h.items() if k != "epoch_s"}

    assert [same(h) for h in resumed.history] == [same(h) for h in straight.history]
    for key, value in straight.params.items():
        np.testing.assert_array_equal(value, resumed.params[key], err_msg=key)
    assert resumed.test_accuracy == straight.test_accuracy and resumed.best_epoch == straight.best_epoch


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_checkpoint_predicts_what_the_final_test_pass_did(name):
    m, cfg, data, device = _method(name), _cfg(name), _data(), Counting()
    result = m.train(cfg, device, data)
    state = _roundtrip(result.state)
    pred = predict_from_state(state, device, data.shape, data.x_test)
    assert torch.equal(pred, torch.as_tensor(state["test_predictions"]))
    assert float((pred == data.y_test).float().mean()) == pytest.approx(result.test_accuracy)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_mutated_config_reaches_the_checkpoints_optimizers(name):
    m, cfg, data = _method(name), _cfg(name), _data()
    state = m.train(cfg.model_copy(update={"epochs": 1}), Counting(), data).state
    mutated = cfg.model_copy(update={"lr": 0.123})
    retune_state(state, mutated)
    lrs = m.lrs(mutated)
    for opt_name, opt_state in state["optimizers"].items():
        assert all(group["lr"] == lrs[opt_name] for group in opt_state["param_groups"]), opt_name
    assert any(lr == 0.123 for lr in lrs.values())
