"""The replay model of a `recorded` device: fitted to the measurements once, kept on disk for every
process and trial.

The model: a tanh MLP (`hidden` widths) on controls scaled from the envelope to [-1, 1], predicting
the responses standardised per output. The fit: `steps` Adam steps on minibatches of `batch` rows
with a one-cycle learning rate (peak `lr`), on at most two CPU threads, seeded, kept at its best
on a tenth of the training rows (so a small file is not overfitted). Chosen on the
synthetic lab of bench/recorded.py (10k rows, 20 -> 20; R-fit-s): full-batch L-BFGS took 6-9 s to
reach a held-out relative error of 0.08-0.15, full-batch Adam longer still (the earlier 1,000 epochs
of Adam took 68-266 s); 4,000 small steps reach ~0.07 in a few seconds.

Reported (`FitResult.info`), on the held-out rows (`holdout` of them, drawn with `seed`): the RMSE
overall and per output, the RMSE relative to the responses' spread (RMSE / std, 0 = perfect, 1 = no
better than the mean), R^2, and the same relative error of a least-squares linear fit for scale.
The replay noise is the held-out residuals' spread per output (robust: 1.4826 x their median
absolute deviation).

Cache: keyed by the sha256 of the data file(s) and every setting that changes the fit; one file per
fit under `<cache dir>/recorded/` (written to a temporary name, then renamed: a process never reads
half a file), plus a per-process dictionary. A second process, a trial on the same node, or a sweep
resumed tomorrow loads the fit in milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .configs import RecordedConfig
from .recorded_data import Measurements, content_digest, read_measurements

CHECK_EVERY = 100  # fit steps between two looks at the rows kept aside
FORMAT = 2  # bump when what a cached fit holds changes
FIT_FIELDS = ("n_inputs", "n_params", "n_outputs", "input_range", "param_range", "holdout", "min_rows",
              "hidden", "steps", "batch", "lr", "weight_decay", "seed", "delimiter", "decimal", "header", "drop",
              "dead_tolerance")


class RecordedModel(torch.nn.Module):
    """The fitted model: forward(x[B, n_in], theta[B, n_params] or [n_params]) -> y[B, n_out]."""

    def __init__(self, n_controls: int, n_outputs: int, hidden: tuple[int, ...],
                 lo: torch.Tensor, hi: torch.Tensor, y_mean: torch.Tensor, y_std: torch.Tensor):
        super().__init__()
        layers, width = [], n_controls
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.Tanh()]
            width = h
        layers.append(torch.nn.Linear(width, n_outputs))
        self.net = torch.nn.Sequential(*layers)
        self.register_buffer("lo", lo.to(torch.float32))  # [n_controls] envelope low
        self.register_buffer("hi", hi.to(torch.float32))
        self.register_buffer("y_mean", y_mean.to(torch.float32))  # [n_out]
        self.register_buffer("y_std", y_std.to(torch.float32))

    def standardised(self, u: torch.Tensor) -> torch.Tensor:
        return self.net(2 * (u - self.lo) / (self.hi - self.lo) - 1)

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if theta.ndim == 1:
            theta = theta.expand(x.shape[0], -1)
        u = torch.cat([x, theta], dim=1)
        return self.standardised(u) * self.y_std + self.y_mean


@dataclass
class FitResult:
    state: dict  # the model's state_dict
    noise_std: torch.Tensor  # [n_out] replay noise
    info: dict  # held-out errors and facts (JSON-able)


def new_model(cfg: RecordedConfig, state: dict | None = None) -> RecordedModel:
    """A model of cfg's shape; with `state`, the fitted one."""
    z = torch.zeros
    n_ctrl = cfg.n_inputs + cfg.n_params
    model = RecordedModel(n_ctrl, cfg.n_outputs, tuple(cfg.hidden), z(n_ctrl), z(n_ctrl) + 1,
                          z(cfg.n_outputs), z(cfg.n_outputs) + 1)
    if state is not None:
        model.load_state_dict(state)
    return model


def cache_root(cfg: RecordedConfig) -> Path:
    base = cfg.cache_dir or os.environ.get("PHYSFARM_CACHE_DIR") or Path.home() / ".cache" / "physfarm"
    return Path(base).expanduser() / "recorded"


def fit_key(cfg: RecordedConfig) -> str:
    settings = {f: getattr(cfg, f) for f in FIT_FIELDS}
    blob = json.dumps({"format": FORMAT, "data": content_digest(cfg), "settings": settings},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_MEMO: dict[str, FitResult] = {}
_MEMO_LOCK = threading.Lock()


def fitted(cfg: RecordedConfig) -> FitResult:
    """The fit for cfg's data and settings: from this process, else the disk cache, else fitted now
    (and stored). `info["cached"]` says which; `info["fit_seconds"]` is the original fit's time."""
    key = fit_key(cfg)
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
    if hit is not None:
        return hit
    path = cache_root(cfg) / f"{key}.pt"
    t0 = time.monotonic()
    result = _load(path)
    if result is not None:
        result.info.update(cached=True, load_seconds=round(time.monotonic() - t0, 4))
    else:
        result = fit(read_measurements(cfg), cfg)
        _store(path, result)
        result.info["cached"] = False
    with _MEMO_LOCK:
        _MEMO[key] = result
    return result


def _load(path: Path) -> FitResult | None:
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        return FitResult(saved["state"], saved["noise_std"], json.loads(saved["info"]))
    except Exception:  # noqa: BLE001 - a damaged cache file is refitted (and rewritten), never trusted
        return None


def _store(path: Path, result: FitResult) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save({"state": result.state, "noise_std": result.noise_std, "info": json.dumps(result.info)}, tmp)
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    except OSError:
        pass  # a read-only home: the fit still serves this process


def fit(m: Measurements, cfg: RecordedConfig) -> FitResult:
    """Fit the replay model to the measurements (see the module docstring)."""
    t0 = time.monotonic()
    u, y = m.u, m.y
    n = u.shape[0]
    n_hold = max(2, int(round(cfg.holdout * n)))
    if n < cfg.min_rows or n - n_hold < 2:
        raise ValueError(f"{m.files[0]}: {n} rows of data, need at least {cfg.min_rows} (set min_rows lower "
                         f"only if you accept a poor fit); {n_hold} are held out to measure the error")
    lo = np.array([cfg.input_range[0]] * cfg.n_inputs + [cfg.param_range[0]] * cfg.n_params)
    hi = np.array([cfg.input_range[1]] * cfg.n_inputs + [cfg.param_range[1]] * cfg.n_params)
    perm = np.random.default_rng(cfg.seed).permutation(n)
    hold, train = perm[:n_hold], perm[n_hold:]
    y_mean = y[train].mean(0)
    y_std = np.maximum(y[train].std(0), 1e-8 * (np.abs(y_mean) + 1.0))
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    threads = torch.get_num_threads()
    try:
        # At most two threads: the model is small, and more fight the trainers for a busy machine's cores.
        torch.set_num_threads(max(1, min(2, threads)))
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(cfg.seed)
            model = RecordedModel(u.shape[1], y.shape[1], tuple(cfg.hidden), t(lo), t(hi), t(y_mean), t(y_std))
            best_step = _adam(model, t(u[train]), t((y[train] - y_mean) / y_std), cfg)
            model.eval()
            with torch.no_grad():
                pred = model(t(u[hold, : cfg.n_inputs]), t(u[hold, cfg.n_inputs:])).double().numpy()
                pred_tr = model(t(u[train, : cfg.n_inputs]), t(u[train, cfg.n_inputs:])).double().numpy()
    finally:
        torch.set_num_threads(threads)
    resid = y[hold] - pred
    spread = y[hold].std(0)
    info = {
        "fitted": True,
        "files": [str(f) for f in m.files],
        "rows": int(n),
        "train_rows": int(len(train)),
        "holdout_rows": int(n_hold),
        **_errors("holdout", y[hold], pred),
        "holdout_rmse_per_output": np.sqrt((resid**2).mean(0)).tolist(),
        "train_rmse": float(np.sqrt(((y[train] - pred_tr) ** 2).mean())),
        **_errors("linear_holdout", y[hold], _linear_fit(u[train], y[train], u[hold])),
        "response_std_per_output": spread.tolist(),
        "data": m.summary(),
        "notes": m.notes(),
        "fit_steps": best_step,  # the step the model was kept at (its best on a tenth of the training rows)
        "fit_seconds": round(time.monotonic() - t0, 3),
    }
    # The replay noise: the held-out residuals' spread per output, robustly (1.4826 x the median absolute
    # deviation, the std of a Gaussian): one stray row (a placeholder of zeros) must not make a dead
    # channel's replay noisy.
    noise_std = t(1.4826 * np.median(np.abs(resid - np.median(resid, axis=0)), axis=0))
    info["noise_std_per_output"] = noise_std.tolist()
    return FitResult({k: v.detach().clone() for k, v in model.state_dict().items()}, noise_std, info)


def _errors(prefix: str, y: np.ndarray, pred: np.ndarray) -> dict:
    resid = y - pred
    sse, sst = float((resid**2).sum()), max(float(((y - y.mean(0)) ** 2).sum()), 1e-30)
    return {f"{prefix}_rmse": float(np.sqrt((resid**2).mean())),
            f"{prefix}_relative_rmse": float(np.sqrt(sse / sst)),  # RMSE over the responses' spread
            f"{prefix}_r2": float(1 - sse / sst)}


def _linear_fit(u: np.ndarray, y: np.ndarray, u_new: np.ndarray) -> np.ndarray:
    """Least squares y ~ [u, 1] (the scale the MLP's error is read against)."""
    a = np.concatenate([u, np.ones((u.shape[0], 1))], axis=1)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return np.concatenate([u_new, np.ones((u_new.shape[0], 1))], axis=1) @ coef


def _adam(model: RecordedModel, u: torch.Tensor, z: torch.Tensor, cfg: RecordedConfig) -> int:
    """Minibatch Adam on the standardised mean squared error, the learning rate in one cycle (up to
    `lr` over the first 30 % of the steps, then down to ~0), rows drawn in seeded random order.

    A tenth of the rows given (never the held-out ones the error is reported on) is kept aside and
    measured every `CHECK_EVERY` steps; the model ends as it was at its best there, so a small file
    is not overfitted by a step count sized for a large one. Returns the step it ended at."""
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(u.shape[0], generator=gen)
    n_check = max(2, u.shape[0] // 10)
    check, rows = perm[:n_check], perm[n_check:]
    u_fit, z_fit, u_chk, z_chk = u[rows], z[rows], u[check], z[check]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    n, batch = u_fit.shape[0], min(cfg.batch, u_fit.shape[0])
    order, at = torch.randperm(n, generator=gen), 0
    best, best_state, best_step = float("inf"), None, 0
    for step in range(1, cfg.steps + 1):
        if at + batch > n:
            order, at = torch.randperm(n, generator=gen), 0
        idx = order[at : at + batch]
        at += batch
        loss = torch.mean((model.standardised(u_fit[idx]) - z_fit[idx]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % CHECK_EVERY == 0 or step == cfg.steps:
            with torch.no_grad():
                err = float(torch.mean((model.standardised(u_chk) - z_chk) ** 2))
            if err < best:
                best, best_step = err, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return best_step


__all__ = ["RecordedModel", "FitResult", "fitted", "fit", "new_model", "fit_key", "cache_root"]
