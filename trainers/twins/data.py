"""Measuring fitting data through the `Device` protocol, splitting it, and the twin error (nRMSE)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import TwinConfig


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
