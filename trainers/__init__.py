"""Learning: physical layers, the PAT autograd function, trainers. Never imports `farm`.

The names below are imported on first use (PEP 562): validating a config (trainers.config,
trainers.registry) imports no torch."""
from __future__ import annotations

import importlib

_LAZY = {"PATConfig": "trainers.config", "train_pat": "trainers.pat", "Dataset": "trainers.types",
         "Device": "trainers.types", "TrainResult": "trainers.types"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainers' has no attribute {name!r}")
