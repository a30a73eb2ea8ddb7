"""Training methods by name, and the contract every method keeps.

A method (`Method`) is its typed config class plus four functions:

    train(config, device, data, report=None, state=None, twin=None) -> TrainResult
        runs with no Tune around it; calls report(metrics, state) once per epoch, where `state` is a
        checkpoint (`trainers.checkpoint`) from which `train(..., state=state)` continues exactly
    network(config, device, shape) -> torch.nn.Module
        the untrained network, built without measuring, into which a checkpoint's weights load
    predict(net, x, config, device) -> labels[N]
        measured on the device
    lrs(config) -> {optimizer name: learning rate}
        for putting a mutated config into a checkpoint (PBT)

`load_trained` and `predict_from_state` are the shared ways back from a checkpoint to predictions.
`tests/test_trainer_contract.py` holds every registered method to this.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pydantic import BaseModel

from .config import DigitalConfig, InSilicoConfig, PATConfig, PhyLLConfig

if TYPE_CHECKING:
    from .datashape import DataShape


@dataclass(frozen=True)
class Method:
    """A method's config class, and where its four functions live (imported on first use, so that
    validating a config imports no torch)."""

    name: str
    config_class: type[BaseModel]
    module: str  # the module holding the functions
    functions: tuple[str, str, str, str]  # (train, network, predict, lrs)

    def _function(self, i: int) -> Callable:
        return getattr(importlib.import_module(self.module), self.functions[i])

    @property
    def train(self) -> Callable:
        return self._function(0)

    @property
    def network(self) -> Callable:
        return self._function(1)

    @property
    def predict(self) -> Callable:
        return self._function(2)

    @property
    def lrs(self) -> Callable:
        return self._function(3)


METHODS: dict[str, Method] = {
    "pat": Method("pat", PATConfig, "trainers.pat", ("train_pat", "pnn_network", "pnn_predict", "pnn_lrs")),
    "insilico": Method("insilico", InSilicoConfig, "trainers.pat",
                       ("train_insilico", "pnn_network", "pnn_predict", "pnn_lrs")),
    "digital": Method("digital", DigitalConfig, "trainers.baselines",
                      ("train_digital", "digital_network", "digital_predict", "digital_lrs")),
    "phyll": Method("phyll", PhyLLConfig, "trainers.phyll",
                    ("train_phyll", "phyll_network", "phyll_predict", "phyll_lrs")),
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown training method '{name}'; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def config_of(state: dict) -> BaseModel:
    """The validated trainer config a checkpoint was made with."""
    cfg = state.get("config")
    if not cfg:
        raise ValueError("this checkpoint holds no config (saved by an older physfarm); give the config")
    return method(str(cfg.get("method", "pat"))).config_class.model_validate(cfg)


def load_trained(state: dict, device, shape: DataShape, config: BaseModel | None = None):
    """The network a checkpoint stands for (its selected weights), built on `device`."""
    from .checkpoint import selected_weights

    config = config or config_of(state)
    net = method(config.method).network(config, device, shape)
    net.load_state_dict(selected_weights(state))
    net.eval()
    return net


def predict_from_state(state: dict, device, shape: DataShape, x, config: BaseModel | None = None):
    """Labels of x predicted by a checkpoint's network, measured on `device`."""
    import torch

    config = config or config_of(state)
    net = load_trained(state, device, shape, config)
    with torch.no_grad():
        return method(config.method).predict(net, x, config, device)


def retune_state(state: dict, config: BaseModel) -> dict:
    """A checkpoint with `config`'s learning rates in its optimizer states (PBT's exploit)."""
    from .checkpoint import retune

    return retune(state, method(config.method).lrs(config))
