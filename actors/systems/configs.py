"""The configs of the simulators physfarm ships: pydantic models only (no torch), so that a sweep
config is validated, and `physfarm sweep --check` answers, without importing the physics. Each
simulator module imports its config from here (`config_class`)."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..outputs import DEAD_TOLERANCE

SlotOrder = Literal["concat", "interleave"]


def slot_order_field():
    """The `slot_order` config field (same meaning and default in every slot-driven system)."""
    return Field(default="concat",
                 description="concat: all x slots then all theta slots; interleave: spread theta")


class SimConfig(BaseModel):
    """Knobs common to every simulator. Scales multiply the system's nominal values from PHYSICS.md:
    1.0 is the documented device, 0.0 switches the effect off (mismatch=noise=drift=0 => device equals
    its ideal model)."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    seed: int = Field(default=0, description="seeds mismatch (fixed per device), noise and drift")
    mismatch: float = Field(default=1.0, ge=0.0, description="scale on the nominal mismatch")
    noise: float = Field(default=1.0, ge=0.0, description="scale on the nominal measurement noise")
    drift: float = Field(default=0.0, ge=0.0, description="scale on the nominal drift rate (0 = none)")
    drift_clock: Literal["calls", "time"] = Field(
        default="calls", description="drift advances per device call, or per second of wall time"
    )
    adc_bits: int | None = Field(default=None, ge=1, le=32, description="ADC resolution; None = ideal")
    latency_call_s: float = Field(default=0.0, ge=0.0, description="seconds slept per call")
    latency_row_s: float = Field(default=0.0, ge=0.0, description="seconds slept per row")
    fault_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="fraction of calls raising DeviceError")
    max_rows: int = Field(default=256, ge=1, description="most rows per device call")


class OscillatorsConfig(SimConfig):
    kind: Literal["oscillators"] = "oscillators"
    n: int = Field(default=64, ge=1, le=4096, description="number of oscillators (= n_inputs)")
    n_outputs: int | None = Field(default=None, ge=1, description="oscillators read out (default n)")
    dt: float = Field(default=0.1, gt=0.0, description="RK4 step (dimensionless time)")
    steps: int = Field(default=5, ge=1, description="RK4 steps; T = steps * dt")
    eta: float = Field(default=0.1, description="device's nonlinearity error at mismatch=1")
    coupling_error: float = Field(default=0.05, ge=0.0, description="std of the coupling error at mismatch=1")
    input_noise: float = Field(default=0.02, ge=0.0, description="std of the noise on q(0) at noise=1")
    drift_coupling: float = Field(default=0.002, ge=0.0,
                                  description="coupling random-walk std per sqrt(call or second) at drift=1")
    eta_in_coupling: bool = Field(default=False, description="the device's nonlinearity error also enters the "
                                  "coupling term, sum_j S_ij (sin((1+eta) q_j) - sin((1+eta) q_i)), as in the "
                                  "PAT authors' Fashion-MNIST 'experiment'")


class ShgConfig(SimConfig):
    kind: Literal["shg"] = "shg"
    n_inputs: int = Field(default=48, ge=1, description="shaper channels driven by the data x")
    n_params: int = Field(default=16, ge=0, description="shaper channels set by trainable theta")
    n_outputs: int | None = Field(default=None, ge=1, description="spectrometer outputs (default M)")
    window_bins: int | None = Field(default=None, ge=1, description="SH bins imaged, centred on n_c "
                                    "(default M; at most 2M-1)")
    adc_bits: int | None = Field(default=12, ge=1, le=32, description="spectrometer ADC bits (None = ideal)")
    full_scale: float = Field(default=1.25, gt=0.0, description="ADC full scale, in units of the nominal peak")
    kappa_m: float = Field(default=1.5, gt=0.0, description="phase-matching kappa times M")
    beta: float = Field(default=0.02, description="device's residual chirp (rad/channel^2) at mismatch=1")
    phase_matching_error: float = Field(default=0.05, ge=0.0, description="relative error of kappa and n_c")
    gain_error: float = Field(default=0.03, ge=0.0, description="std of the per-channel shaper gain error")
    laser_noise: float = Field(default=0.01, ge=0.0, description="relative laser power std per row at noise=1")
    detector_noise: float = Field(default=0.005, ge=0.0, description="detector std, fraction of full scale")
    drift_power: float = Field(default=0.001, ge=0.0, description="log laser power walk per sqrt(clock)")

    @model_validator(mode="after")
    def _sizes(self) -> "ShgConfig":
        m = self.n_inputs + self.n_params
        if m < 2:
            raise ValueError(f"shg needs at least 2 shaper channels (n_inputs + n_params), got {m}")
        window = self.window_bins or m
        if window > 2 * m - 1:
            raise ValueError(f"window_bins={window} exceeds the {2 * m - 1} SH bins of M={m} channels; "
                             f"use window_bins <= {2 * m - 1}")
        if self.n_outputs is not None and self.n_outputs > window:
            raise ValueError(f"n_outputs={self.n_outputs} exceeds the {window} imaged SH bins "
                             f"(window_bins); use n_outputs <= {window} or widen window_bins")
        return self


class PlateConfig(SimConfig):
    kind: Literal["plate"] = "plate"
    n_inputs: int = Field(default=64, ge=1, description="slots driven by the data x")
    n_params: int = Field(default=32, ge=0, description="slots set by trainable theta")
    n_outputs: int = Field(default=10, ge=1, description="microphone windows read out")
    slot_order: SlotOrder = slot_order_field()
    structure_seed: int = Field(default=0, description="seeds the plate itself (mode frequencies, couplings)")
    modes: int = Field(default=12, ge=1, le=64, description="K, number of plate modes")
    f_min_khz: float = Field(default=0.2, gt=0.0)
    f_max_khz: float = Field(default=2.0, gt=0.0)
    q: float = Field(default=30.0, gt=0.5, description="typical quality factor (Q_m ~ U(q-5, q+5))")
    slot_ms: float = Field(default=1.0, gt=0.0, description="tau, ms per control slot")
    coil_gain: float = Field(default=1.5, gt=0.0, description="g in F = tanh(g u)")
    substeps: int = Field(default=4, ge=1, le=200, description="integration steps per slot")
    duffing: float = Field(default=0.004, ge=0.0, description="typical gamma_m / w_m^2 (cubic stiffness)")
    samples_per_period: int = Field(default=20, ge=2, description="microphone samples per period of f_max")
    freq_error: float = Field(default=0.01, ge=0.0, description="relative f_m and Q_m error at mismatch=1")
    mic_noise: float = Field(default=0.01, ge=0.0, description="microphone std, fraction of full scale")
    alpha_per_k: float = Field(default=-1.3e-4, description="relative f_m change per kelvin")
    drift_temperature: float = Field(default=0.1, ge=0.0, description="K per sqrt(call or second) at drift=1")


class CircuitConfig(SimConfig):
    kind: Literal["circuit"] = "circuit"
    n_inputs: int = Field(default=64, ge=1, description="slots driven by the data x")
    n_params: int = Field(default=32, ge=0, description="slots set by trainable theta")
    n_outputs: int = Field(default=10, ge=1, description="voltage samples read out (window ends)")
    slot_order: SlotOrder = slot_order_field()
    slot_s: float = Field(default=1e-6, gt=0.0, description="seconds per control slot")
    v_max: float = Field(default=0.8, gt=0.0, description="V_in = v_max * u")
    f0_per_slot_rate: float = Field(default=0.5, gt=0.0, description="resonance f0 / slot rate")
    q: float = Field(default=3.0, gt=0.0, description="quality factor sqrt(L/C)/R")
    capacitance_f: float = Field(default=1e-9, gt=0.0, description="C in farads (sets L and R)")
    i_s: float = Field(default=1e-12, gt=0.0, description="diode saturation current at 300 K (A)")
    ideality: float = Field(default=1.8, gt=0.0, description="diode ideality factor n")
    temperature_k: float = Field(default=300.0, gt=0.0)
    substeps: int = Field(default=4, ge=1, le=256, description="integration steps per slot")
    adc_bits: int | None = Field(default=12, ge=1, le=32, description="ADC bits on [-2, 2] V (None = ideal)")
    full_scale_v: float = Field(default=2.0, gt=0.0, description="ADC full scale: [-full_scale_v, +full_scale_v]")
    component_error: float = Field(default=0.05, ge=0.0, description="max relative R, L, C error at mismatch=1")
    johnson_noise_v: float = Field(default=1e-3, ge=0.0, description="voltage noise std (V) at noise=1")
    drift_temperature: float = Field(default=0.1, ge=0.0, description="K per sqrt(call or second) at drift=1")

    def components(self) -> tuple[float, float, float]:
        """Nominal (R, L, C) in ohm, henry, farad."""
        c = self.capacitance_f
        w0 = 2 * math.pi * self.f0_per_slot_rate / self.slot_s
        l_ = 1.0 / (w0**2 * c)
        return math.sqrt(l_ / c) / self.q, l_, c


class CavityConfig(SimConfig):
    kind: Literal["cavity"] = "cavity"
    n_inputs: int = Field(default=64, ge=1, description="surface elements driven by the data x")
    n_params: int = Field(default=0, ge=0, description="surface elements set by trainable theta")
    n_outputs: int = Field(default=64, ge=1, description="detected output modes / pixels")
    structure_seed: int = Field(default=0, description="seeds the cavity's fingerprint T and E0")
    phase_bits: int | None = Field(default=None, ge=1, le=16, description="surface phase resolution")
    background: float = Field(default=0.5, ge=0.0, description="mean |E0|^2 of the static background")
    t_error: float = Field(default=0.05, ge=0.0, description="relative model error of T at mismatch=1")
    detector_noise: float = Field(default=0.01, ge=0.0, description="additive std (unit level) at noise=1")
    shot_noise: float = Field(default=0.01, ge=0.0, description="shot noise std at y = 1, at noise=1")
    drift_phase: float = Field(default=0.003, ge=0.0, description="rad per sqrt(call or second) at drift=1")
    full_scale: float = Field(default=16.0, gt=0.0, description="ADC full scale (units of the mean level)")


class RecordedConfig(SimConfig):
    kind: Literal["recorded"] = "recorded"
    path: str | None = Field(default=None, description="one table of measured rows: controls (x then theta) "
                             "then responses, as CSV, Parquet or NPZ (arrays controls/responses or x/theta/y)")
    controls_path: str | None = Field(default=None, description="the controls (x then theta) as their own "
                                      "table, with responses_path (a lab's separate x and y files)")
    responses_path: str | None = Field(default=None, description="the responses, row for row with controls_path")
    delimiter: Literal["auto", "comma", "tab", "semicolon", "space"] = Field(
        default="auto", description="CSV column separator (auto: detected; ambiguity is reported)")
    decimal: Literal["auto", "point", "comma"] = Field(default="auto", description="CSV decimal mark")
    header: Literal["auto"] | bool = Field(default="auto", description="CSV: whether line 1 names the "
                                           "columns (auto: when it does not parse as numbers)")
    drop: list[Literal["zero_rows", "duplicate_rows"]] = Field(
        default_factory=list, description="suspicious rows left out of the fit (they are reported either way)")
    dead_tolerance: float = Field(default=DEAD_TOLERANCE, ge=0.0, lt=1.0, description="an output whose spread is below "
                                  "this fraction of the largest output's spread is dead (never varies)")
    name: str = Field(default="recorded", description="the device's name in its spec")
    n_inputs: int = Field(ge=1, description="columns holding the data inputs x")
    n_params: int = Field(default=0, ge=0, description="columns holding the physical parameters theta")
    n_outputs: int = Field(ge=1, description="columns holding the measured response")
    input_range: tuple[float, float] = Field(description="safe envelope of x, as measured")
    param_range: tuple[float, float] = Field(default=(0.0, 1.0), description="safe envelope of theta")
    holdout: float = Field(default=0.2, gt=0.0, lt=0.9, description="fraction of rows held out")
    min_rows: int = Field(default=20, ge=4, description="fewest rows accepted")
    hidden: tuple[int, ...] = Field(default=(256,), description="the replay model's hidden widths (tanh MLP)")
    steps: int = Field(default=4000, ge=1, le=10_000_000, description="Adam steps of the fit")
    batch: int = Field(default=256, ge=1, description="rows per fit step")
    lr: float = Field(default=0.01, gt=0.0, le=10.0, description="the fit's peak learning rate (one cycle)")
    weight_decay: float = Field(default=0.0, ge=0.0, description="L2 penalty on the model's weights")
    cache_dir: str | None = Field(default=None, description="where fits are kept for every process "
                                  "(default: $PHYSFARM_CACHE_DIR, else ~/.cache/physfarm)")
    # A replay is its own (only) model: there is no nominal model to be mismatched against. Kept out of
    # the logged config, where "mismatch: 1.0" would mean nothing.
    mismatch: float = Field(default=0.0, ge=0.0, exclude=True,
                            description="not applicable: the fit is the only model of a recorded device")

    @model_validator(mode="after")
    def _knobs(self) -> "RecordedConfig":
        two = (self.controls_path, self.responses_path)
        if self.path and any(two):
            raise ValueError("give either path (one table) or controls_path and responses_path, not both")
        if not self.path and not all(two):
            raise ValueError("the measured data: set path (one table: controls then responses) or both "
                             "controls_path and responses_path (two files, row for row)")
        if self.mismatch:
            raise ValueError(f"mismatch={self.mismatch}: a recorded device replays a model fitted to its "
                             f"measurements, there is no nominal model to mismatch; leave mismatch unset")
        if self.drift > 0:
            raise ValueError(f"drift={self.drift}: a recorded device replays a fitted model and has no "
                             f"drift; use drift: 0")
        if self.adc_bits is not None:
            raise ValueError("adc_bits: a recorded device replays digitised data already; leave adc_bits unset")
        for field in ("input_range", "param_range"):
            lo, hi = getattr(self, field)
            if not lo < hi:
                raise ValueError(f"{field} must be (low, high) with low < high, got ({lo}, {hi})")
        return self
