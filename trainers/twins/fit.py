"""Fitting a twin to measurements: a grid scan of named constants, then Adam on the normalised error,
keeping the weights with the lowest held-out error."""
from __future__ import annotations

import copy
import math
import time

import torch

from ..config import TwinConfig
from ..optim import Adam, cosine_lr
from .data import TwinData, split, twin_error
from .models import MLPModel, Twin, ideal_of, mlp_of


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
    ideal = ideal_of(twin)
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
    mlp = mlp_of(twin)
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
    opt = Adam(params, lr=config.lr)
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
        opt.param_groups[0]["lr"] = cosine_lr(config.lr, config.lr * 0.05, step, steps)
        if step % check_every == 0 or step == steps:
            err = twin_error(twin, held if held is not None else train)
            if err < best_err:
                best_err, best_state = err, copy.deepcopy(twin.model.state_dict())
    if best_state is not None:
        twin.model.load_state_dict(best_state)
    return {"error": best_err, "error_before": before, "train_error": twin_error(twin, train),
            "fit_s": time.monotonic() - t0, "steps": steps, **({"scanned": scanned} if scanned else {})}
