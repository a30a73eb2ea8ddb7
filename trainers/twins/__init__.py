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

from .cache import CACHE_ENV, cache_dir, cache_key, device_identity
from .data import TwinData, collect, measure_data, nrmse, predict, sample_thetas, split, twin_error
from .fit import fit, scan_constants
from .models import (KINDS, CalibratedModel, MLPModel, ResidualModel, Twin, build_twin, promote_buffers,
                     twin_from_state, twin_state)
from .obtain import Obtained, fit_new, obtain_twin, refit, verify

__all__ = ["CACHE_ENV", "cache_dir", "cache_key", "device_identity", "TwinData", "collect", "measure_data",
           "nrmse", "predict", "sample_thetas", "split", "twin_error", "fit", "scan_constants", "KINDS",
           "CalibratedModel", "MLPModel", "ResidualModel", "Twin", "build_twin", "promote_buffers",
           "twin_from_state", "twin_state", "Obtained", "fit_new", "obtain_twin", "refit", "verify"]
