"""Where fitted twins are kept: a device's identity, the cache key of (device, fit settings), the
folder, a file lock so that concurrent trials fit once, and atomic saves."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from ..config import TwinConfig

CACHE_ENV = "PHYSFARM_TWIN_CACHE"
# Settings that change which twin a fit produces (so they are part of the cache key); the others
# (cache location, refresh policy) do not.
_FIT_FIELDS = ("kind", "samples", "thetas", "repeats", "focus", "focus_width", "holdout", "steps",
               "fit_batch", "lr", "hidden", "depth", "calibrate", "io_calibration", "seed")


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


def save_atomic(path: Path, state: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a reader never sees half a file
