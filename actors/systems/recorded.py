"""`recorded`: a device replayed from measured data (PHYSICS.md section 6).

A lab brings measured (controls, response) rows; physfarm fits a model to them, reports its error on
a held-out split and serves forward passes from it, adding Gaussian noise with the spread (std per
output) of the held-out residuals, so the replay is as noisy as the model is wrong plus the device
was noisy. It keeps a group working when the hardware is away.

File formats (one row per measurement; controls u = concat(x, theta) first, then the response):
  CSV  n_inputs + n_params + n_outputs numeric columns; an optional first line of column names.
  NPZ  arrays `controls` [N, n_inputs + n_params] and `responses` [N, n_outputs], or `x` [N, n_inputs],
       optional `theta` [N, n_params] and `y` [N, n_outputs].
Bad files (wrong column count, non-numeric or non-finite values, controls outside the declared
envelope, too few rows) raise ValueError naming the file and the row.

The fit: an MLP (tanh, `hidden` widths) on controls scaled from the envelope to [-1, 1] and responses
standardised, trained full-batch (or in batches of 1024) with Adam (cosine learning-rate decay) for
`epochs` on one CPU thread (about 2-5 s for a thousand rows), seeded: the same file
and config always give the same model. Reading and fitting are I/O and work, so they happen on
`connect()` (or the first forward / `ideal_model()`), never in the constructor; a fit is cached per
process by (file path, size, mtime, fit settings). `info` then holds the held-out errors.
Mismatch does not apply (the fit is the only model there is); drift and ADC are not simulated.
"""
from __future__ import annotations

import copy
import csv
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..spec import SystemSpec
from .configs import RecordedConfig
from .base import SimulatedSystem




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


def read_rows(path: Path, n_controls: int, n_outputs: int) -> tuple[np.ndarray, np.ndarray]:
    """Read (controls [N, n_controls], responses [N, n_outputs]) from a CSV or NPZ file, float64.

    Raises ValueError naming the file and the offending row for anything malformed.
    """
    if not path.is_file():
        raise ValueError(f"recorded device: data file '{path}' does not exist; set `path` to a CSV or NPZ file")
    width = n_controls + n_outputs
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if {"controls", "responses"} <= keys:
                u, y = z["controls"], z["responses"]
            elif {"x", "y"} <= keys:
                parts = [z["x"]] + ([z["theta"]] if "theta" in keys else [])
                if any(p.ndim != 2 for p in parts):
                    raise ValueError(f"{path}: arrays x/theta must be 2-D [rows, columns]")
                u, y = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0], z["y"]
            else:
                raise ValueError(f"{path}: an NPZ needs arrays 'controls' and 'responses' (or 'x', "
                                 f"optional 'theta', and 'y'); it has {sorted(keys)}")
        for name, arr, want in (("controls", u, n_controls), ("responses", y, n_outputs)):
            if arr.ndim != 2 or arr.shape[1] != want:
                raise ValueError(f"{path}: {name} has shape {list(arr.shape)}, expected [rows, {want}] "
                                 f"(n_inputs + n_params = {n_controls}, n_outputs = {n_outputs})")
        if u.shape[0] != y.shape[0]:
            raise ValueError(f"{path}: {u.shape[0]} rows of controls but {y.shape[0]} rows of responses")
        try:
            data = np.concatenate([u.astype(np.float64), y.astype(np.float64)], axis=1)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: arrays must hold numbers ({exc})") from None
        where = lambda i: f"row {i} (0-based)"  # noqa: E731
    else:
        rows: list[list[float]] = []
        lines: list[int] = []
        with path.open(newline="") as fh:
            for lineno, rec in enumerate(csv.reader(fh), start=1):
                if not rec or all(not c.strip() for c in rec):
                    continue  # blank line
                try:
                    vals = [float(c) for c in rec]
                except ValueError:
                    if not rows and lineno == 1:
                        if len(rec) != width:
                            raise ValueError(
                                f"{path}: header (line 1) has {len(rec)} columns, expected {width} "
                                f"(n_inputs + n_params = {n_controls} controls, then {n_outputs} outputs)"
                            ) from None
                        continue  # a header of column names
                    bad = next(c for c in rec if not _is_float(c))
                    raise ValueError(f"{path}: line {lineno} has a non-numeric value {bad!r}; every "
                                     f"cell must be a number") from None
                if len(vals) != width:
                    raise ValueError(
                        f"{path}: line {lineno} has {len(vals)} columns, expected {width} "
                        f"(n_inputs + n_params = {n_controls} controls, then {n_outputs} outputs)")
                rows.append(vals)
                lines.append(lineno)
        data = np.array(rows, dtype=np.float64).reshape(len(rows), width)
        where = lambda i: f"line {lines[i]}"  # noqa: E731
    finite = np.isfinite(data)
    if not finite.all():
        i, j = (int(a) for a in np.argwhere(~finite)[0])
        raise ValueError(f"{path}: {where(i)}, column {j + 1} is {data[i, j]}; every value must be a "
                         f"finite number (drop or re-measure that row)")
    return data[:, :n_controls], data[:, n_controls:]


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


_CACHE: dict[tuple, tuple[dict, dict, dict]] = {}
_CACHE_LOCK = threading.Lock()


class Recorded(SimulatedSystem):
    config_class = RecordedConfig

    def __init__(self, config: RecordedConfig | dict | None = None, **overrides):
        super().__init__(config, **overrides)
        self._model: RecordedModel | None = None
        self._noise_std: torch.Tensor | None = None
        self._lock = threading.Lock()
        self.info = {"fitted": False, "path": self.config.path}

    @property
    def spec(self) -> SystemSpec:
        cfg = self.config
        return SystemSpec(
            name=cfg.name, n_inputs=cfg.n_inputs, n_params=cfg.n_params, n_outputs=cfg.n_outputs,
            input_range=cfg.input_range, param_range=cfg.param_range, max_rows=cfg.max_rows,
            latency_s=self._spec_latency(),
        )

    def connect(self) -> None:
        """Read the data file and fit the model (cached per process)."""
        self._ensure_fitted()

    def ideal_model(self) -> torch.nn.Module:
        """The fitted model itself (a copy, its weights trainable), without the replay noise."""
        model = copy.deepcopy(self._ensure_fitted())
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def metadata(self) -> dict:
        """Held-out errors and fit facts (fits first if needed)."""
        self._ensure_fitted()
        return dict(self.info)

    def _measure(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        model = self._ensure_fitted()
        y = model(x, theta)
        if self.config.noise > 0:
            y = y + self.config.noise * self._noise_std * self._randn(*y.shape)
        return y

    # -- fitting ----------------------------------------------------------------------------------
    def _ensure_fitted(self) -> RecordedModel:
        with self._lock:
            if self._model is None:
                self._fit()
            return self._model

    def _fit_key(self) -> tuple:
        cfg = self.config
        path = Path(cfg.path).expanduser().resolve()
        st = path.stat() if path.is_file() else None
        fields = ("n_inputs", "n_params", "n_outputs", "input_range", "param_range", "holdout",
                  "min_rows", "hidden", "epochs", "lr", "weight_decay", "seed")
        return (str(path), st and st.st_size, st and st.st_mtime_ns) + tuple(
            (f, getattr(cfg, f)) for f in fields)

    def _fit(self) -> None:
        key = self._fit_key()
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
        if hit is None:
            threads = torch.get_num_threads()
            try:
                # One thread: the model is tiny, and a busy machine makes torch's thread pool crawl.
                torch.set_num_threads(1)
                with torch.enable_grad():  # a first forward() fits lazily, and forward runs under no_grad
                    hit = self._fit_uncached()
            finally:
                torch.set_num_threads(threads)
            with _CACHE_LOCK:
                _CACHE[key] = hit
        state, extra, info = hit
        model = self._new_model(extra)
        model.load_state_dict(state)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)  # the device's copy never trains; ideal_model() re-enables grads
        self._model = model
        self._noise_std = extra["noise_std"]
        self.info = dict(info)

    def _new_model(self, extra: dict) -> RecordedModel:
        cfg = self.config
        return RecordedModel(cfg.n_inputs + cfg.n_params, cfg.n_outputs, tuple(cfg.hidden),
                             extra["lo"], extra["hi"], extra["y_mean"], extra["y_std"])

    def _fit_uncached(self) -> tuple[dict, dict, dict]:
        cfg = self.config
        t0 = time.monotonic()
        path = Path(cfg.path).expanduser()
        n_ctrl = cfg.n_inputs + cfg.n_params
        u, y = read_rows(path, n_ctrl, cfg.n_outputs)
        n = u.shape[0]
        n_hold = max(2, int(round(cfg.holdout * n)))
        if n < cfg.min_rows or n - n_hold < 2:
            raise ValueError(f"{path}: {n} rows of data, need at least {cfg.min_rows} (set min_rows lower "
                             f"only if you accept a poor fit); {n_hold} are held out to measure the error")
        lo = np.array([cfg.input_range[0]] * cfg.n_inputs + [cfg.param_range[0]] * cfg.n_params)
        hi = np.array([cfg.input_range[1]] * cfg.n_inputs + [cfg.param_range[1]] * cfg.n_params)
        outside = (u < lo) | (u > hi)
        if outside.any():
            i, j = (int(a) for a in np.argwhere(outside)[0])
            field, rng = ("x", cfg.input_range) if j < cfg.n_inputs else ("theta", cfg.param_range)
            raise ValueError(f"{path}: data row {i} (0-based), control column {j + 1} ({field}) is "
                             f"{u[i, j]:.6g}, outside the declared {field} range {list(rng)}; widen "
                             f"{'input_range' if field == 'x' else 'param_range'} or drop the row")
        perm = np.random.default_rng(cfg.seed).permutation(n)
        hold, train = perm[:n_hold], perm[n_hold:]
        y_mean = y[train].mean(0)
        y_std = np.maximum(y[train].std(0), 1e-8 * (np.abs(y_mean) + 1.0))
        t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        extra = {"lo": t(lo), "hi": t(hi), "y_mean": t(y_mean), "y_std": t(y_std)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = self._new_model(extra)
            gen = torch.Generator().manual_seed(cfg.seed)
            u_tr, z_tr = t(u[train]), t((y[train] - y_mean) / y_std)
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
            batch = min(1024, len(train))
            for _ in range(cfg.epochs):
                order = torch.randperm(len(train), generator=gen) if batch < len(train) else None
                for i in range(0, len(train), batch):
                    idx = order[i : i + batch] if order is not None else slice(None)
                    loss = torch.mean((model.standardised(u_tr[idx]) - z_tr[idx]) ** 2)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                sched.step()
        with torch.no_grad():
            pred = model(t(u[hold, : cfg.n_inputs]), t(u[hold, cfg.n_inputs :])).double().numpy()
            pred_tr = model(t(u[train, : cfg.n_inputs]), t(u[train, cfg.n_inputs :])).double().numpy()
        resid = y[hold] - pred
        rmse_out = np.sqrt((resid**2).mean(0))
        sse, sst = (resid**2).sum(), max(((y[hold] - y[hold].mean(0)) ** 2).sum(), 1e-30)
        spread = y[hold].std(0)
        info = {
            "fitted": True,
            "path": str(path),
            "rows": int(n),
            "train_rows": int(len(train)),
            "holdout_rows": int(n_hold),
            "holdout_rmse": float(np.sqrt((resid**2).mean())),
            "holdout_rmse_per_output": rmse_out.tolist(),
            "holdout_relative_rmse": float(np.sqrt(sse / sst)),  # RMSE over the responses' spread
            "holdout_r2": float(1 - sse / sst),
            "train_rmse": float(np.sqrt(((y[train] - pred_tr) ** 2).mean())),
            "response_std_per_output": spread.tolist(),
            "fit_seconds": round(time.monotonic() - t0, 3),
        }
        extra["noise_std"] = t(resid.std(0))  # the replay noise: spread of the held-out residuals
        info["noise_std_per_output"] = extra["noise_std"].tolist()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, extra, info


__all__ = ["Recorded", "RecordedConfig", "RecordedModel", "read_rows"]
