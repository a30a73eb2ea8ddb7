"""Digital twins: differentiable models of a device, fitted to measurements made through the device.

A twin has the device's call signature, twin(x[B, n_inputs], theta[n_params] or [B, n_params]) ->
y[B, n_outputs], and is what PAT differentiates in its backward pass (and what in-silico training
trains on). Kinds (`TwinConfig.kind`):

- `ideal`: the system's `ideal_model()` as given (its nominal physics); nothing is measured.
- `calibrated`: the ideal model wrapped with fitted per-input and per-output gain and offset,
  y = g_out * ideal(g_in * x + b_in, theta) + b_out; any named float buffers of the ideal model
  (`TwinConfig.calibrate`, e.g. oscillators' `eta` and `coupling_error`) become fitted parameters too.
  Generic: it needs nothing from a system beyond `ideal_model()` returning a torch module.
- `mlp`: a neural network (inputs and parameters scaled by the envelope, outputs standardised),
  fitted to the measurements alone.
- `residual`: the calibrated model plus a fitted MLP correction (which starts at zero).

Data (`collect`) are measured through the `Device` protocol only, one request per parameter vector:
uniform over the safe envelope, optionally a fraction concentrated around given parameter vectors
(where a training is), inputs optionally drawn from given rows; repeated measurements are averaged.
The twin error is the normalised RMS error on held-out parameter vectors:
sqrt(mean (twin - y)^2) / sqrt(mean (y - mean_per_output(y))^2)  (0: perfect; 1: no better than each
output's mean).

Cache (`obtain_twin`): a fitted twin is saved as `<dir>/<key>.pt` with `<key>` a hash of the device's
identity (its spec and, where the device exposes one, its system config) and the twin settings that
shape the fit; a file lock makes concurrent trials wait for the first one's fit and then load it, so a
sweep measures the device for its twin once. When the device does not expose its system config (e.g.
a client of a pooled device, known only by its name, spec and nominal model), a cache hit is verified
with a small probe measurement and refitted if the probe disagrees.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TwinConfig

KINDS = ("ideal", "calibrated", "mlp", "residual")
CACHE_ENV = "PHYSFARM_TWIN_CACHE"
# Settings that change which twin a fit produces (so they are part of the cache key); the others
# (cache location, refresh policy) do not.
_FIT_FIELDS = ("kind", "samples", "thetas", "repeats", "focus", "focus_width", "holdout", "steps",
               "fit_batch", "lr", "hidden", "depth", "calibrate", "io_calibration", "seed")


# ---- models ----------------------------------------------------------------------------------------
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


# ---- measuring -------------------------------------------------------------------------------------
@dataclass
class TwinData:
    """Measurements grouped by parameter vector: x[K, R, n_in], theta[K, n_params], y[K, R, n_out]."""

    x: torch.Tensor
    theta: torch.Tensor
    y: torch.Tensor
    calls: int = 0
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return self.x.shape[0] * self.x.shape[1]

    def groups(self, idx: torch.Tensor) -> "TwinData":
        return TwinData(self.x[idx], self.theta[idx], self.y[idx])


def _uniform(shape, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def sample_thetas(spec, n: int, gen: torch.Generator, centres: list[torch.Tensor] | None = None,
                  focus: float = 0.0, width: float = 0.1) -> torch.Tensor:
    """n parameter vectors: uniform over the envelope, except round(focus * n) of them drawn uniform
    within +-width (fraction of the envelope's half-span) of the given centres, in turn, clipped."""
    lo, hi = spec.param_range
    thetas = _uniform((n, spec.n_params), lo, hi, gen)
    n_focus = int(round(focus * n)) if centres else 0
    half = (hi - lo) / 2 * width
    for i in range(n_focus):
        c = centres[i % len(centres)].reshape(-1).to(torch.float32)
        thetas[i] = (c + _uniform((spec.n_params,), -half, half, gen)).clamp(lo, hi)
    return thetas


def collect(device, thetas: torch.Tensor, rows_per_theta: int, gen: torch.Generator, repeats: int = 1,
            inputs: torch.Tensor | None = None, input_groups: int | None = None) -> TwinData:
    """Measure `rows_per_theta` inputs per parameter vector on `device` (one request per vector and
    chunk of at most max_rows rows), each `repeats` times, averaged. Inputs: uniform over the input
    range; for the first `input_groups` vectors (default all) rows drawn from `inputs` (clamped into
    the range) when given."""
    spec = device.spec
    lo, hi = spec.input_range
    k = thetas.shape[0]
    xs = _uniform((k, rows_per_theta, spec.n_inputs), lo, hi, gen)
    if inputs is not None and inputs.shape[0] > 0:
        g = k if input_groups is None else min(k, input_groups)
        pick = torch.randint(0, inputs.shape[0], (g, rows_per_theta), generator=gen)
        xs[:g] = inputs.detach().to(torch.float32)[pick].clamp(lo, hi)
    ys = torch.zeros(k, rows_per_theta, spec.n_outputs)
    calls, t0 = 0, time.monotonic()
    step = max(1, spec.max_rows)
    for i in range(k):
        theta = thetas[i].to(torch.float32)
        for j in range(0, rows_per_theta, step):
            xb = xs[i, j : j + step]
            acc = torch.zeros(xb.shape[0], spec.n_outputs)
            for _ in range(repeats):
                acc += torch.as_tensor(device.forward(xb, theta), dtype=torch.float32)
                calls += 1
            ys[i, j : j + step] = acc / repeats
    return TwinData(xs, thetas.to(torch.float32), ys, calls, time.monotonic() - t0)


def measure_data(device, config: TwinConfig, gen: torch.Generator, samples: int | None = None,
                 centres: list[torch.Tensor] | None = None, width: float | None = None,
                 focus: float | None = None, inputs: torch.Tensor | None = None) -> TwinData:
    samples = samples or config.samples
    k = max(1, min(config.thetas, samples))
    focus = config.focus if focus is None else focus
    thetas = sample_thetas(device.spec, k, gen, centres, focus, config.focus_width if width is None else width)
    n_focus = int(round(focus * k)) if centres else 0  # the focused vectors come first
    return collect(device, thetas, max(1, samples // k), gen, config.repeats, inputs, n_focus)


# ---- fitting ---------------------------------------------------------------------------------------
def nrmse(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Normalised RMS error: RMS(pred - y) / RMS(y - per-output mean of y) (rows are dim 0)."""
    pred, y = pred.reshape(-1, y.shape[-1]), y.reshape(-1, y.shape[-1])
    spread = (y - y.mean(0)).pow(2).mean().sqrt().clamp_min(1e-12)
    return float((pred - y).pow(2).mean().sqrt() / spread)


@torch.no_grad()
def predict(twin: torch.nn.Module, data: TwinData, chunk: int = 4096) -> torch.Tensor:
    """The twin's outputs for every measured row, y_hat[K, R, n_out]."""
    out = torch.empty_like(data.y)
    for i in range(data.x.shape[0]):
        for j in range(0, data.x.shape[1], chunk):
            out[i, j : j + chunk] = twin(data.x[i, j : j + chunk], data.theta[i])
    return out


def twin_error(twin: torch.nn.Module, data: TwinData) -> float:
    return nrmse(predict(twin, data), data.y)


def split(data: TwinData, holdout: float, gen: torch.Generator) -> tuple[TwinData, TwinData | None]:
    """Hold out whole parameter vectors (so the error says how the twin does at new theta); with a
    single vector, hold out rows instead."""
    if holdout <= 0:
        return data, None
    k, r = data.x.shape[:2]
    if k >= 2:
        n_hold = min(k - 1, max(1, int(round(holdout * k))))
        perm = torch.randperm(k, generator=gen)
        return data.groups(perm[n_hold:]), data.groups(perm[:n_hold])
    n_hold = min(r - 1, max(1, int(round(holdout * r))))
    if n_hold < 1:
        return data, None
    perm = torch.randperm(r, generator=gen)
    a, b = perm[n_hold:], perm[:n_hold]
    return (TwinData(data.x[:, a], data.theta, data.y[:, a]), TwinData(data.x[:, b], data.theta, data.y[:, b]))


def _mlp_of(twin: Twin) -> MLPModel | None:
    if isinstance(twin.model, MLPModel):
        return twin.model
    if isinstance(twin.model, ResidualModel):
        return twin.model.correction
    return None


def _ideal_of(twin: Twin) -> torch.nn.Module | None:
    if isinstance(twin.model, CalibratedModel):
        return twin.model.ideal
    if isinstance(twin.model, ResidualModel):
        return twin.model.calibrated.ideal
    return None


def _affine_residual(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Normalised RMS error of y[N, n_out] after the best per-output affine map of pred[N, n_out]
    (least squares, closed form): how well pred explains y up to each output's gain and offset."""
    pc, yc = pred - pred.mean(0), y - y.mean(0)
    g = (pc * yc).sum(0) / pc.pow(2).sum(0).clamp_min(1e-30)
    return float((yc - g * pc).pow(2).mean().sqrt() / yc.pow(2).mean().sqrt().clamp_min(1e-12))


@torch.no_grad()
def scan_constants(twin: Twin, data: TwinData, scan: dict, max_rows: int = 256) -> dict[str, float]:
    """Set each named scalar constant of the twin's ideal model (buffer or promoted parameter) to the
    value on its grid, (low, high, points) then `points` again within one step of the best, that best
    explains the measurements up to per-output gain and offset (`_affine_residual`). In order, one at
    a time. Returns the chosen values."""
    ideal = _ideal_of(twin)
    if ideal is None:
        raise ValueError(f"twin.scan needs a 'calibrated' or 'residual' twin, not '{twin.kind}'")
    k, r = data.x.shape[:2]
    x = data.x.reshape(k * r, -1)
    theta = data.theta.repeat_interleave(r, dim=0)
    y = data.y.reshape(k * r, -1)
    if k * r > max_rows:  # evenly spread rows: every parameter vector keeps some
        pick = torch.linspace(0, k * r - 1, max_rows).long()
        x, theta, y = x[pick], theta[pick], y[pick]
    chosen = {}
    for name, (low, high, points) in scan.items():
        try:
            target = ideal.get_parameter(name)
        except AttributeError:
            try:
                target = ideal.get_buffer(name)
            except AttributeError:
                raise ValueError(f"twin.scan: the ideal model has no constant '{name}'") from None
        if target.numel() != 1:
            raise ValueError(f"twin.scan: '{name}' has {target.numel()} values; only scalars can be scanned")
        lo, hi = float(low), float(high)
        best = None
        for _ in range(2):  # a coarse grid, then a fine one around its best
            grid = torch.linspace(lo, hi, int(points))
            errs = []
            for v in grid.tolist():
                target.fill_(v)
                errs.append(_affine_residual(twin(x, theta), y))
            i = min(range(len(errs)), key=errs.__getitem__)
            best = float(grid[i])
            step = (hi - lo) / (int(points) - 1)
            lo, hi = best - step, best + step
        target.fill_(best)
        chosen[name] = best
    return chosen


def fit(twin: Twin, data: TwinData, config: TwinConfig, gen: torch.Generator, steps: int | None = None,
        warm: bool = False) -> dict:
    """Fit `twin` to `data` in place (Adam on the normalised squared error, minibatches of rows with
    their own theta); keep the weights with the lowest held-out error. Returns the fit's figures."""
    t0 = time.monotonic()
    steps = config.steps if steps is None else steps
    train, held = split(data, config.holdout, gen)
    mlp = _mlp_of(twin)
    y_flat = train.y.reshape(-1, train.y.shape[-1])
    if mlp is not None and not warm:
        if isinstance(twin.model, MLPModel):
            mlp.y_mean.copy_(y_flat.mean(0))
            mlp.y_std.copy_(y_flat.std(0).clamp_min(1e-3 * float(y_flat.std()) + 1e-12))
        else:  # a correction: scale like the calibrated model's residuals (unknown yet): the outputs' spread
            mlp.y_mean.zero_()
            mlp.y_std.fill_(float(y_flat.std()) + 1e-12)
    scanned = scan_constants(twin, train, config.scan) if (config.scan and not warm) else {}
    params = [p for p in twin.parameters() if p.requires_grad]
    before = twin_error(twin, held) if held is not None else None
    if not params or steps == 0:
        err = before if held is not None else twin_error(twin, train)
        return {"error": err, "error_before": before, "train_error": twin_error(twin, train),
                "fit_s": time.monotonic() - t0, "steps": 0, **({"scanned": scanned} if scanned else {})}
    k, r = train.x.shape[:2]
    x_rows = train.x.reshape(k * r, -1)
    y_rows = y_flat
    group = torch.arange(k).repeat_interleave(r)
    scale = (y_rows - y_rows.mean(0)).pow(2).mean().clamp_min(1e-12)
    opt = torch.optim.Adam(params, lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=config.lr * 0.05)
    batch = min(config.fit_batch, k * r)
    # The starting weights are a candidate too: a fit never hands back a worse twin than it started with.
    best_err = before if before is not None else math.inf
    best_state = copy.deepcopy(twin.model.state_dict()) if before is not None else None
    check_every = max(1, steps // 10)
    for step in range(1, steps + 1):
        idx = torch.randint(0, k * r, (batch,), generator=gen)
        pred = twin(x_rows[idx], train.theta[group[idx]])
        loss = (pred - y_rows[idx]).pow(2).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % check_every == 0 or step == steps:
            err = twin_error(twin, held if held is not None else train)
            if err < best_err:
                best_err, best_state = err, copy.deepcopy(twin.model.state_dict())
    if best_state is not None:
        twin.model.load_state_dict(best_state)
    return {"error": best_err, "error_before": before, "train_error": twin_error(twin, train),
            "fit_s": time.monotonic() - t0, "steps": steps, **({"scanned": scanned} if scanned else {})}


# ---- identity and cache ----------------------------------------------------------------------------
def _unwrap(device):
    seen = 0
    while hasattr(device, "inner") and seen < 16:  # MeteredDevice and similar wrappers
        device = device.inner
        seen += 1
    return device


def device_identity(device) -> tuple[dict, bool]:
    """(identity, strong): the device's spec plus its system config when it exposes one (`system_config`
    or `config`, a pydantic model or a dict: strong); otherwise its name and a hash of its nominal
    model (weak: two devices differing only in their fabrication error would look alike)."""
    inner = _unwrap(device)
    spec = device.spec.model_dump(mode="json")
    spec.pop("latency_s", None)  # informative, not the device
    for attr in ("system_config", "config"):
        cfg = getattr(inner, attr, None)
        if callable(cfg) and not hasattr(cfg, "model_dump"):
            try:
                cfg = cfg()
            except Exception:  # noqa: BLE001 - an unrelated method of that name
                cfg = None
        if hasattr(cfg, "model_dump"):
            cfg = cfg.model_dump(mode="json")
        if isinstance(cfg, dict):
            cfg = {k: v for k, v in cfg.items() if not str(k).startswith("latency")}
            return {"spec": spec, "system": cfg}, True
    ident: dict = {"spec": spec, "name": getattr(inner, "name", None), "type": type(inner).__name__}
    ideal = getattr(device, "ideal_model", None)
    if callable(ideal):
        try:
            h = hashlib.sha256()
            for k, v in sorted(ideal().state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            ident["ideal"] = h.hexdigest()[:16]
        except Exception:  # noqa: BLE001 - no nominal model: the name and spec must do
            pass
    return ident, False


def cache_key(device, config: TwinConfig, extra: dict | None = None) -> tuple[str, bool]:
    ident, strong = device_identity(device)
    fit = {k: getattr(config, k) for k in _FIT_FIELDS}
    if config.scan:  # only when used, so the keys of twins fitted without a scan stay as they were
        fit["scan"] = {k: list(v) for k, v in config.scan.items()}
    blob = json.dumps({"device": ident, "twin": fit, "extra": extra or {}}, sort_keys=True, default=str)
    name = ident["spec"]["name"]
    return f"{name}-{config.kind}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}", strong


def cache_dir(config: TwinConfig) -> Path:
    path = config.cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/physfarm/twins"
    return Path(path).expanduser()


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on `path` (created) for the duration: POSIX flock, released on exit or crash."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


@dataclass
class Obtained:
    twin: Twin
    calls: int = 0  # device calls spent (measuring and verifying)
    cached: bool = False
    figures: dict = field(default_factory=dict)


def fit_new(device, config: TwinConfig, spec, gen: torch.Generator, centres=None, width=None) -> Obtained:
    twin = build_twin(config, spec, getattr(device, "ideal_model", None))
    data = measure_data(device, config, gen, centres=centres, width=width)
    figures = fit(twin, data, config, gen)
    twin.info.update(error=figures["error"], error_before=figures["error_before"],
                     train_error=figures["train_error"], rows=data.rows, device_calls=data.calls,
                     device_seconds=round(data.seconds, 4), fit_s=round(figures["fit_s"], 3), refreshes=0)
    if "scanned" in figures:
        twin.info["scanned"] = figures["scanned"]
    return Obtained(twin, data.calls, False, figures)


def verify(twin: Twin, device, config: TwinConfig, gen: torch.Generator) -> tuple[bool, float, int]:
    """Measure a few fresh parameter vectors and compare with the twin's recorded held-out error."""
    data = collect(device, sample_thetas(device.spec, 2, gen), 32, gen, config.repeats)
    err = twin_error(twin, data)
    ref = twin.error if twin.error is not None else err
    return err <= 2.0 * ref + 0.05, err, data.calls


def obtain_twin(device, config: TwinConfig, centres: list[torch.Tensor] | None = None,
                width: float | None = None, extra_key: dict | None = None) -> Obtained:
    """The twin `config` asks for: the ideal model, or a fitted twin from the cache, or a new fit on
    data measured through `device` (then cached). `centres`/`width` say where the training starts
    (for `config.focus`); `extra_key` must distinguish anything else that shapes the fit."""
    spec = device.spec
    gen = torch.Generator().manual_seed(config.seed)
    if not config.fitted:
        twin = build_twin(config, spec, getattr(device, "ideal_model", None))
        return Obtained(twin)
    if not config.cache:
        return fit_new(device, config, spec, gen, centres, width)
    key, strong = cache_key(device, config, extra_key)
    folder = cache_dir(config)
    path = folder / f"{key}.pt"
    with file_lock(folder / f"{key}.lock"):
        if path.is_file():
            try:
                saved = torch.load(path, weights_only=False)
                twin = twin_from_state(saved, spec, getattr(device, "ideal_model", None))
            except Exception:  # noqa: BLE001 - a stale or broken file: fit again
                twin = None
            if twin is not None:
                calls = 0
                if not strong:
                    ok, err, calls = verify(twin, device, config, torch.Generator().manual_seed(config.seed + 7))
                    twin.info["verify_error"] = err
                else:
                    ok = True
                if ok:
                    twin.info.update(cache_key=key, cached=True)
                    return Obtained(twin, calls, True, {"error": twin.error})
        got = fit_new(device, config, spec, gen, centres, width)
        got.twin.info.update(cache_key=key, cached=False)
        _save(path, twin_state(got.twin, config))
        return got


def refit(twin: Twin, device, config: TwinConfig, gen: torch.Generator, centres: list[torch.Tensor],
          inputs: torch.Tensor | None = None) -> dict:
    """Refresh `twin` in place on fresh measurements concentrated around `centres` (the parameters the
    training is at now; at least half the vectors there), inputs partly from `inputs` (what the layers
    are fed now); warm-started from the current weights. Returns the figures, device calls included."""
    if not config.fitted or not isinstance(twin, Twin) or twin.kind == "ideal":
        return {"calls": 0, "skipped": True}
    focus = max(config.focus, 0.5)
    data = measure_data(device, config, gen, samples=config.refresh_samples or config.samples,
                        centres=centres, focus=focus, inputs=inputs)
    figures = fit(twin, data, config, gen, warm=True)
    twin.info.update(error=figures["error"], train_error=figures["train_error"],
                     refreshes=int(twin.info.get("refreshes", 0)) + 1, cached=False)
    return {**figures, "calls": data.calls, "rows": data.rows, "device_seconds": data.seconds}
