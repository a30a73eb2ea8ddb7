"""Devices: the `PhysicalSystem` protocol, simulators, instrument drivers and the device actor.

The names below are imported on first use (PEP 562), so that importing a light submodule (the
instrument server's argument parser, the errors) does not import torch.
"""
from __future__ import annotations

import importlib

_LAZY = {"DeviceError": "actors.errors", "EnvelopeError": "actors.errors", "PhysicalSystem": "actors.protocol",
         "SystemSpec": "actors.spec"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'actors' has no attribute {name!r}")
