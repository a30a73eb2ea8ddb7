"""Network instruments: the framed TCP protocol, the client device (`kind: instrument`) and a
standalone server that puts any physfarm system behind the protocol (docs/instrument-protocol.md)."""
from .client import Instrument, InstrumentConfig

__all__ = ["Instrument", "InstrumentConfig"]
