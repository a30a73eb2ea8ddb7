"""Devices: the `PhysicalSystem` protocol, simulators, instrument drivers and the device actor."""
from .errors import DeviceError, EnvelopeError
from .protocol import PhysicalSystem
from .spec import SystemSpec

__all__ = ["DeviceError", "EnvelopeError", "PhysicalSystem", "SystemSpec"]
