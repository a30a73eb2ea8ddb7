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

from dataclasses import dataclass
from typing import Callable

import torch
from pydantic import BaseModel

from .baselines import digital_lrs, digital_network, digital_predict, train_digital
from .checkpoint import retune, selected_weights
from .config import DigitalConfig, InSilicoConfig, PATConfig
from .datashape import DataShape
from .pat import pnn_lrs, pnn_network, pnn_predict, train_insilico, train_pat
from .phyll import PhyLLConfig, phyll_lrs, phyll_network, phyll_predict, train_phyll


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[BaseModel]
    train: Callable
    network: Callable
    predict: Callable
    lrs: Callable


METHODS: dict[str, Method] = {
    "pat": Method("pat", PATConfig, train_pat, pnn_network, pnn_predict, pnn_lrs),
    "insilico": Method("insilico", InSilicoConfig, train_insilico, pnn_network, pnn_predict, pnn_lrs),
    "digital": Method("digital", DigitalConfig, train_digital, digital_network, digital_predict, digital_lrs),
    "phyll": Method("phyll", PhyLLConfig, train_phyll, phyll_network, phyll_predict, phyll_lrs),
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


def load_trained(state: dict, device, shape: DataShape, config: BaseModel | None = None) -> torch.nn.Module:
    """The network a checkpoint stands for (its selected weights), built on `device`."""
    config = config or config_of(state)
    net = method(config.method).network(config, device, shape)
    net.load_state_dict(selected_weights(state))
    net.eval()
    return net


def predict_from_state(state: dict, device, shape: DataShape, x: torch.Tensor,
                       config: BaseModel | None = None) -> torch.Tensor:
    """Labels of x predicted by a checkpoint's network, measured on `device`."""
    config = config or config_of(state)
    net = load_trained(state, device, shape, config)
    with torch.no_grad():
        return method(config.method).predict(net, x, config, device)


def retune_state(state: dict, config: BaseModel) -> dict:
    """A checkpoint with `config`'s learning rates in its optimizer states (PBT's exploit)."""
    return retune(state, method(config.method).lrs(config))
