"""The twin models: the kinds (ideal, calibrated, mlp, residual), built unfitted, saved and rebuilt."""
from __future__ import annotations

import torch

from ..config import TwinConfig

KINDS = ("ideal", "calibrated", "mlp", "residual")


def _as_rows(theta: torch.Tensor, rows: int) -> torch.Tensor:
    return theta.expand(rows, -1) if theta.ndim == 1 else theta


def promote_buffers(module: torch.nn.Module, names: list[str]) -> None:
    """Turn the named float buffers of `module` (dotted paths into submodules) into parameters, in
    place: the physical constants a calibration fits. Unknown names raise ValueError listing the
    buffers there are."""
    for name in names:
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        buf = owner._buffers.get(leaf)
        if buf is None:
            if isinstance(owner._parameters.get(leaf), torch.nn.Parameter):
                continue  # promoted already (e.g. loaded from a saved twin)
            known = [n for n, b in module.named_buffers() if b.is_floating_point() or b.is_complex()]
            raise ValueError(f"twin.calibrate: the ideal model has no buffer '{name}'; "
                             f"its float buffers are {', '.join(known) or 'none'}")
        if not (buf.is_floating_point() or buf.is_complex()):
            raise ValueError(f"twin.calibrate: buffer '{name}' has dtype {buf.dtype}; only float or complex "
                             f"buffers can be fitted")
        del owner._buffers[leaf]
        owner.register_parameter(leaf, torch.nn.Parameter(buf.detach().clone()))


class CalibratedModel(torch.nn.Module):
    """y = g_out * ideal(g_in * x + b_in, theta) + b_out, with the ideal model's chosen buffers fitted."""

    def __init__(self, ideal: torch.nn.Module, n_inputs: int, n_outputs: int, calibrate: list[str],
                 io_calibration: bool = True):
        super().__init__()
        self.ideal = ideal
        for p in self.ideal.parameters():  # a nominal model's own parameters are not fitted unless named
            p.requires_grad_(False)
        promote_buffers(self.ideal, list(calibrate))
        for name in calibrate:
            self.ideal.get_parameter(name).requires_grad_(True)
        self.io = io_calibration
        self.in_gain = torch.nn.Parameter(torch.ones(n_inputs), requires_grad=io_calibration)
        self.in_offset = torch.nn.Parameter(torch.zeros(n_inputs), requires_grad=io_calibration)
        self.out_gain = torch.nn.Parameter(torch.ones(n_outputs), requires_grad=io_calibration)
        self.out_offset = torch.nn.Parameter(torch.zeros(n_outputs), requires_grad=io_calibration)

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if self.io:
            x = x * self.in_gain + self.in_offset
        y = self.ideal(x, theta)
        return y * self.out_gain + self.out_offset if self.io else y


class MLPModel(torch.nn.Module):
    """An MLP of concat(x, theta), both mapped from the envelope onto [-1, 1]; outputs standardised
    with the fitting data's per-output mean and spread (buffers set before the fit)."""

    def __init__(self, spec, hidden: int, depth: int, zero_last: bool = False):
        super().__init__()
        n_in = spec.n_inputs + spec.n_params
        layers: list[torch.nn.Module] = []
        width = n_in
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
            width = hidden
        last = torch.nn.Linear(width, spec.n_outputs)
        if zero_last:
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
        self.net = torch.nn.Sequential(*layers, last)
        (xl, xh), (pl, ph) = spec.input_range, spec.param_range
        self.register_buffer("x_mid", torch.tensor((xl + xh) / 2))
        self.register_buffer("x_half", torch.tensor((xh - xl) / 2))
        self.register_buffer("p_mid", torch.tensor((pl + ph) / 2))
        self.register_buffer("p_half", torch.tensor((ph - pl) / 2))
        self.register_buffer("y_mean", torch.zeros(spec.n_outputs))
        self.register_buffer("y_std", torch.ones(spec.n_outputs))

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        theta = _as_rows(theta, x.shape[0])
        u = torch.cat([(x - self.x_mid) / self.x_half, (theta - self.p_mid) / self.p_half], dim=1)
        return self.net(u) * self.y_std + self.y_mean


class ResidualModel(torch.nn.Module):
    """The calibrated ideal model plus a fitted MLP correction (zero at the start)."""

    def __init__(self, calibrated: CalibratedModel, correction: MLPModel):
        super().__init__()
        self.calibrated = calibrated
        self.correction = correction

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return self.calibrated(x, theta) + self.correction(x, theta)


class Twin(torch.nn.Module):
    """A device's twin: `model` (the kind's module) plus what is known about it in `info`
    (held-out error, rows and device calls it was fitted on, its cache key, refreshes)."""

    def __init__(self, kind: str, model: torch.nn.Module, info: dict | None = None,
                 config: TwinConfig | None = None):
        super().__init__()
        self.kind = kind
        self.model = model
        self.info: dict = dict(info or {})
        self.config = config  # the settings it was built with (to rebuild it from its state)

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return self.model(x, theta)

    @property
    def error(self) -> float | None:
        return self.info.get("error")


def build_twin(config: TwinConfig, spec, ideal_model=None) -> Twin:
    """An unfitted twin of `config.kind`; `ideal_model` is a zero-argument callable returning the
    system's nominal model (needed by every kind but `mlp`)."""
    kind = config.kind
    if kind not in KINDS:
        raise ValueError(f"twin.kind '{kind}' is not one of {', '.join(KINDS)}")
    if kind == "mlp":
        return Twin(kind, MLPModel(spec, config.hidden, config.depth), config=config)
    if ideal_model is None:
        raise ValueError(f"a '{kind}' twin needs the device's ideal_model()")
    ideal = ideal_model()
    if kind == "ideal":
        return Twin(kind, ideal, config=config)
    cal = CalibratedModel(ideal, spec.n_inputs, spec.n_outputs, config.calibrate, config.io_calibration)
    if kind == "calibrated":
        return Twin(kind, cal, config=config)
    model = ResidualModel(cal, MLPModel(spec, config.hidden, config.depth, zero_last=True))
    return Twin(kind, model, config=config)


def twin_state(twin: torch.nn.Module, config: TwinConfig | None = None) -> dict:
    """Everything to rebuild `twin` (torch.save-able): kind, settings, weights, info. A `Twin` carries
    its own settings; for any other module `config` (None: not rebuildable, given to the trainer)."""
    kind = getattr(twin, "kind", "given")
    config = getattr(twin, "config", None) or config
    return {"kind": kind, "config": config.model_dump() if config is not None else None,
            "state_dict": {k: v.detach().clone() for k, v in twin.state_dict().items()},
            "info": dict(getattr(twin, "info", {}))}


def twin_from_state(state: dict, spec, ideal_model=None) -> Twin:
    """Rebuild a twin saved by `twin_state` (no measurement)."""
    if state.get("config") is None:
        raise ValueError("this saved twin was given to the trainer, not built by it; pass it again as twin=")
    twin = build_twin(TwinConfig.model_validate(state["config"]), spec, ideal_model)
    twin.load_state_dict(state["state_dict"])
    twin.info = dict(state.get("info", {}))
    return twin


def mlp_of(twin: Twin) -> MLPModel | None:
    if isinstance(twin.model, MLPModel):
        return twin.model
    if isinstance(twin.model, ResidualModel):
        return twin.model.correction
    return None


def ideal_of(twin: Twin) -> torch.nn.Module | None:
    if isinstance(twin.model, CalibratedModel):
        return twin.model.ideal
    if isinstance(twin.model, ResidualModel):
        return twin.model.calibrated.ideal
    return None
