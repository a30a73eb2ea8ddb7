"""Obtaining a twin (the ideal model, a cached fit, or a new fit measured through the device) and
refitting it where a training is (drift)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import TwinConfig
from .cache import save_atomic, cache_dir, cache_key, file_lock
from .data import collect, measure_data, sample_thetas, twin_error
from .fit import fit
from .models import Twin, build_twin, twin_from_state, twin_state


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
        save_atomic(path, twin_state(got.twin, config))
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
