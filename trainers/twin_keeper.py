"""A training's digital twin over time (PAT's, and the one in-silico training and PhyLL's `in_silico`
measure): obtained once (given, restored, cached or fitted), probed against the device on the epoch's
last minibatches, refitted on drift or on schedule; and `TwinDevice`, a twin posing as the device
(in-silico training measures on it)."""
from __future__ import annotations

import copy
from collections import deque

import torch

from .config import TwinConfig
from .twins import Twin, nrmse, obtain_twin, refit, twin_from_state, twin_state

PROBE_BATCHES = 4  # training minibatches per layer kept as the probe of twin vs device


class TwinDevice:
    """A twin posing as the device (the `Device` protocol): in-silico training measures on it."""

    def __init__(self, twin: torch.nn.Module, spec):
        self.twin = twin
        self._spec = spec

    @property
    def spec(self):
        return self._spec

    @torch.no_grad()
    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return self.twin(x, theta).to(torch.float32)


class TwinKeeper:
    """Obtains a trainer's twin (given, from a saved state, from the cache or fitted now), probes it
    against the device during training and refits it on drift or on schedule."""

    def __init__(self, config: TwinConfig, device, given: torch.nn.Module | None = None,
                 saved: dict | None = None, init_width: float = 0.1):
        """No I/O: `obtain()` gets the twin (and may measure the device)."""
        self.cfg = config
        self.device = device
        self.given = given
        self.saved = saved
        self.init_width = init_width  # fraction of the envelope the training's theta starts in
        self.twin: torch.nn.Module | None = None
        self.layers: list = []
        self.refreshes = 0
        self.calls = 0  # device calls spent on the twin (fit, verification, refits)
        self.ref_probe: float | None = None  # probe error in the first epoch after the last fit
        self.gen = torch.Generator().manual_seed(self.cfg.seed + 1)  # refresh data
        self.records: list[deque] = []

    def obtain(self) -> torch.nn.Module:
        """The twin: given, rebuilt from the saved state, or from the cache / fitted on measurements
        made now (those device calls count in `calls`)."""
        spec = self.device.spec
        ideal = getattr(self.device, "ideal_model", None)
        saved = self.saved
        if self.given is not None:
            self.twin = copy.deepcopy(self.given) if isinstance(self.given, Twin) else self.given
        elif saved is not None and (saved.get("twin") or {}).get("config") is not None:
            self.twin = twin_from_state(saved["twin"], spec, ideal)
        else:
            lo, hi = spec.param_range
            centre = torch.full((spec.n_params,), (lo + hi) / 2)
            width = max(self.init_width, self.cfg.focus_width)
            extra = {"init_width": width} if self.cfg.focus > 0 else None
            got = obtain_twin(self.device, self.cfg, centres=[centre], width=width, extra_key=extra)
            self.twin, self.calls = got.twin, got.calls
        if saved is not None and saved.get("twin_keeper"):
            k = saved["twin_keeper"]
            self.refreshes, self.calls, self.ref_probe = k["refreshes"], k["calls"], k["ref_probe"]
            self.gen.set_state(k["generator"])
        return self.twin

    @property
    def refittable(self) -> bool:
        return isinstance(self.twin, Twin) and self.twin.kind != "ideal" and self.cfg.fitted

    def error(self) -> float | None:
        info = getattr(self.twin, "info", {}) or {}
        return info.get("error")

    def start_epoch(self, layers: list) -> None:
        """Start probing the twin on `layers` (the physical layers on this keeper's device)."""
        self.layers = layers
        self.records = [deque(maxlen=PROBE_BATCHES) for _ in layers]
        for layer in layers:
            layer.record = True

    def after_step(self) -> None:
        for rec, layer in zip(self.records, self.layers):
            if layer.last is not None:
                rec.append(layer.last)

    @torch.no_grad()
    def probe(self) -> float | None:
        """Twin vs device on the last measured minibatches of each layer (no extra device calls)."""
        errors = []
        for rec in self.records:
            if not rec:
                continue
            pred = torch.cat([self.twin(x, theta) for x, theta, _ in rec])
            meas = torch.cat([y for _, _, y in rec])
            errors.append(nrmse(pred, meas))
        return sum(errors) / len(errors) if errors else None

    def maybe_refresh(self, epoch: int, probe: float | None) -> bool:
        """Refit if the schedule says so or the probe error grew past the thresholds."""
        if self.ref_probe is None and probe is not None:
            self.ref_probe = probe
            due = False
        else:
            due = False
            if probe is not None and self.cfg.refresh_ratio > 0 and self.ref_probe:
                due = probe > self.cfg.refresh_ratio * self.ref_probe
            if probe is not None and self.cfg.refresh_threshold is not None:
                due = due or probe > self.cfg.refresh_threshold
        if self.cfg.refresh_every and epoch % self.cfg.refresh_every == 0:
            due = True
        if not (due and self.refittable):
            return False
        centres = [layer.theta.detach().clone() for layer in self.layers]
        inputs = [x for rec in self.records for x, _, _ in rec]
        got = refit(self.twin, self.device, self.cfg, self.gen, centres,
                    torch.cat(inputs) if inputs else None)
        self.calls += got["calls"]
        self.refreshes += 1
        self.ref_probe = None  # the next epoch's probe is the new reference
        return True

    def metrics(self) -> dict:
        out = {"twin_refreshes_total": self.refreshes, "twin_calls_total": self.calls}
        err = self.error()
        if err is not None:
            out["twin_error"] = float(err)
        return out

    def state(self) -> dict:
        # A twin built from the config can be rebuilt from its state alone; one given to the trainer
        # is saved too (for people), but resuming needs it given again.
        return {"twin": twin_state(self.twin, None if self.given is not None else self.cfg),
                "twin_keeper": {"refreshes": self.refreshes, "calls": self.calls, "ref_probe": self.ref_probe,
                                "generator": self.gen.get_state()}}
