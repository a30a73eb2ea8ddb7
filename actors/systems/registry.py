"""Maps a system `kind` to its class; a kind may also be an import path 'package.module:Class'.

A user-defined system (see docs/devices.md) is any class with a `config_class` (a pydantic model
with a `kind` field) whose instances follow the `PhysicalSystem` protocol; its module must be
importable where it runs (on PYTHONPATH or installed), in the driver and in Ray workers alike.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel


class _Builtin(Mapping):
    """kind -> class of the systems physfarm ships, each imported when first asked for (so that
    importing the registry imports no simulator, and the instrument client, which builds its twin's
    simulator through this registry, and the registry do not import each other)."""

    PATHS = {
        "oscillators": "actors.systems.oscillators:Oscillators",
        "shg": "actors.systems.shg:Shg",
        "plate": "actors.systems.plate:Plate",
        "circuit": "actors.systems.circuit:Circuit",
        "cavity": "actors.systems.cavity:Cavity",
        "recorded": "actors.systems.recorded:Recorded",
        "instrument": "actors.instrument.client:Instrument",
    }

    def __getitem__(self, kind: str) -> type:
        module_name, _, attr = self.PATHS[kind].partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def __iter__(self):
        return iter(self.PATHS)

    def __len__(self) -> int:
        return len(self.PATHS)


BUILTIN: Mapping[str, type] = _Builtin()

# The config class of each shipped kind, importable without the physics (no torch): validating a
# sweep config (`--check`) needs only these.
BUILTIN_CONFIGS = {
    "oscillators": "actors.systems.configs:OscillatorsConfig",
    "shg": "actors.systems.configs:ShgConfig",
    "plate": "actors.systems.configs:PlateConfig",
    "circuit": "actors.systems.configs:CircuitConfig",
    "cavity": "actors.systems.configs:CavityConfig",
    "recorded": "actors.systems.configs:RecordedConfig",
    "instrument": "actors.instrument.config:InstrumentConfig",
}


def config_class(kind: str) -> type[BaseModel]:
    """The config class of `kind` (a shipped kind's without importing its physics)."""
    if kind in BUILTIN_CONFIGS:
        module_name, _, attr = BUILTIN_CONFIGS[kind].partition(":")
        return getattr(importlib.import_module(module_name), attr)
    cls = system_class(kind)
    found = getattr(cls, "config_class", None)
    if found is None:
        raise ValueError(f"system class {cls.__name__} has no `config_class` (a pydantic model)")
    return found


def system_class(kind: str) -> type:
    """The class for `kind`; raises ValueError listing the allowed kinds."""
    if kind in BUILTIN:
        return BUILTIN[kind]
    if ":" in kind:
        module_name, _, attr = kind.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(
                f"cannot import module '{module_name}' for system kind '{kind}': {exc}; put the module's "
                f"folder on PYTHONPATH (for Ray workers too) or pip install the package that holds it"
            ) from None
        cls = getattr(module, attr, None)
        if cls is None:
            raise ValueError(f"module '{module_name}' has no attribute '{attr}' (system kind '{kind}')")
        return cls
    raise ValueError(
        f"unknown system kind '{kind}'; choose one of {', '.join(sorted(BUILTIN))} "
        f"or give an import path 'package.module:Class'"
    )


def validate_system_config(raw: Any) -> BaseModel:
    """Validate a system config dict against its kind's config class (errors keep their field paths)."""
    if isinstance(raw, BaseModel):
        return raw
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ValueError("a system needs a 'kind', e.g. {kind: oscillators}")
    return config_class(str(raw["kind"])).model_validate(raw)


def build_system(config: Any):
    """Construct (without I/O) the system a config describes."""
    cfg = validate_system_config(config if isinstance(config, BaseModel) else dict(config))
    return system_class(cfg.kind)(cfg)
