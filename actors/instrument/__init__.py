"""Network instruments: the framed TCP protocol, the client device (`kind: instrument`) and a
standalone server that puts any physfarm system behind the protocol (docs/instrument-protocol.md).

`Instrument` and `InstrumentConfig` are imported on first use, so that the server's argument parser
(`physfarm instrument serve --help`) does not import torch."""
from __future__ import annotations

import importlib

__all__ = ["Instrument", "InstrumentConfig"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("actors.instrument.client"), name)
    raise AttributeError(f"module 'actors.instrument' has no attribute {name!r}")
