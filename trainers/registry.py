"""Training methods by name: `method` in a config picks (config class, train function).

Every train function has the signature train_x(config, device, data, report=None, state=None)
and returns a `TrainResult`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

from .baselines import train_digital
from .config import DigitalConfig, InSilicoConfig, PATConfig
from .pat import train_insilico, train_pat
from .phyll import PhyLLConfig, train_phyll


@dataclass(frozen=True)
class Method:
    config_class: type[BaseModel]
    train: Callable


METHODS: dict[str, Method] = {
    "pat": Method(PATConfig, train_pat),
    "insilico": Method(InSilicoConfig, train_insilico),
    "digital": Method(DigitalConfig, train_digital),
    "phyll": Method(PhyLLConfig, train_phyll),
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown training method '{name}'; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
