"""Before anything starts: do the data fit the devices as each trial would train them?

`check_fit(cfg)` opens the data (every file the config names: headers for IDX folders, the whole
table for CSV/NPZ), learns each device's spec without I/O (constructors do none; an instrument is
asked nothing: where its config declares no spec it is skipped), then builds each trial's network
on stand-ins that have only the spec. So a device with fewer inputs than the data has features and
no encoder, a patch size that does not divide the images, or fewer outputs than classes is refused
by `physfarm sweep --check` with the same message the trainer would give, before Ray starts.
"""
from __future__ import annotations

from actors.spec import SystemSpec

from .data import DataShape, data_shape
from .datasources import DataError
from .errors import ConfigError


class SpecOnly:
    """A device known by its spec alone (for building a network without measuring anything)."""

    def __init__(self, spec: SystemSpec):
        self._spec = spec

    @property
    def spec(self) -> SystemSpec:
        return self._spec

    def forward(self, x, theta):  # pragma: no cover - never called: building measures nothing
        raise RuntimeError("a spec-only stand-in cannot measure")


def offline_spec(system: dict) -> SystemSpec | None:
    """The spec a system config describes, learnt without I/O; None where only the device knows it."""
    from actors.systems.registry import build_system

    if system.get("kind") == "instrument" and not system.get("expect_spec"):
        return None
    try:
        return build_system(system).spec
    except Exception:  # noqa: BLE001 - a user system whose spec needs its hardware: checked when it runs
        return None


def data_fit_shape(cfg) -> DataShape:
    try:
        return data_shape(cfg.data)
    except DataError as err:
        raise ConfigError(str(err)) from None


def _build(tc, specs: dict[str, SystemSpec | None], shape: DataShape) -> None:
    """Build the network trial config `tc` trains (raises ValueError with the trainer's message)."""
    import torch

    # Built on the CPU, not the "meta" device: meta tensors go through torch's decompositions, whose
    # first use imports torch._dynamo (over a second of the sweep's start-up); these networks hold
    # kilobytes to a few megabytes of weights, and no gradient is recorded.
    method = getattr(tc, "method", None)
    if method in ("pat", "insilico"):
        from trainers.networks import PNN

        names = tc.layer_devices()
        if any(specs.get(n) is None for n in names):
            return
        devices = [SpecOnly(specs[n]) for n in names]
        with torch.no_grad():  # shapes only: nothing measured
            PNN(devices, None, shape.n_features, shape.n_classes, n_layers=tc.n_layers,
                theta_init_scale=tc.layer_init_scales(), readout_scale=tc.readout_scale, hybrid=tc.hybrid,
                input_window=tc.input_window, image_shape=shape.image_shape, encoder=tc.encoder,
                connects=tc.layer_connects(), readout=tc.readout)
    elif method == "phyll":
        from trainers.phyll import PhyLLNet

        spec = specs.get(tc.device)
        if spec is None:
            return
        with torch.no_grad():
            PhyLLNet(spec, tc, shape.n_features, shape.n_classes, None, shape.image_shape)


def check_fit(cfg) -> DataShape:
    """Refuse (ConfigError) any trial whose network cannot be built on these data and devices."""
    from .trainspec import cases, validate_train

    shape = data_fit_shape(cfg)
    specs = {d.name: offline_spec(d.system) for d in cfg.devices}
    names = [d.name for d in cfg.devices]
    seen = set()
    for concrete in cases(cfg.train):
        tc = validate_train(concrete, names)
        key = tc.model_dump_json()
        if key in seen:
            continue
        seen.add(key)
        try:
            _build(tc, specs, shape)
        except ValueError as err:
            raise ConfigError(f"train: {err}") from None
    return shape
