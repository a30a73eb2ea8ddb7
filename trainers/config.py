"""Typed configs of the trainers. `method` selects the trainer; the farm validates a sweep's `train`
section against these before anything starts."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EncoderConfig(BaseModel):
    """How data meet the first physical layer (`train.encoder`; a kind name or a mapping)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["tile", "pad", "downsample", "patches", "linear"] = "tile"
    size: tuple[int, int] | None = Field(default=None, description="downsample: the image size to reach (H, W)")
    mode: Literal["avg", "stride"] = Field(default="avg", description="downsample: average pooling, or every "
                                           "k-th pixel")
    patch: int | None = Field(default=None, ge=1, description="patches: side of the square patches (pixels)")
    fill: Literal["pad", "tile"] = Field(default="pad", description="downsample/patches: how the rows are "
                                         "filled up to the device's n_inputs")
    value: float = Field(default=0.0, ge=0.0, le=1.0, description="pad: the value padded with (feature units)")

    @model_validator(mode="before")
    @classmethod
    def _kind_shorthand(cls, value):
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _needs(self) -> "EncoderConfig":
        if self.kind == "downsample" and self.size is None:
            raise ValueError("encoder.size: required for a downsample encoder, e.g. [14, 14]")
        if self.kind == "patches" and self.patch is None:
            raise ValueError("encoder.patch: required for a patches encoder, e.g. 7 (7x7 pixel patches)")
        return self


class TrainerConfig(BaseModel):
    """Fields every training method shares."""

    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(default=None, description="name of the pool device to train on "
                               "(may be omitted when the config defines exactly one device)")
    epochs: int = Field(default=5, ge=1, le=100_000)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    lr: float = Field(default=0.01, gt=0.0, le=10.0, description="learning rate")
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = Field(default=0, ge=0, description="seeds initialisation and batch order")
    eval_batch_size: int = Field(default=256, ge=1, description="rows per device call when evaluating")
    torch_threads: int = Field(default=1, ge=1, le=256, description="torch CPU threads in the trainer")
    final_test: bool = Field(default=True, description="after the last epoch, measure the test split once on "
                             "the checkpoint selected by validation; off for runs that choose settings and "
                             "must not open the test split")


class TwinConfig(BaseModel):
    """The differentiable digital twin PAT takes its gradients from (and in-silico training trains on).

    kind: `ideal` is the system's nominal physics as given (no measurement); `calibrated` is the ideal
    model with fitted per-input and per-output gain/offset, plus any of its named buffers (physical
    constants, e.g. oscillators' `eta`) promoted to fitted parameters; `mlp` is a neural network fitted
    to measurements only; `residual` is the calibrated model plus a fitted MLP correction.
    Fitting data are measured on the device (so through its actor in a sweep, accounted like any trial):
    `thetas` parameter vectors, uniform over the safe envelope (a `focus` fraction of them concentrated
    where the training is), `samples // thetas` uniform inputs each, every measurement repeated
    `repeats` times and averaged. A fitted twin is cached on disk keyed by the device and these
    settings, so the trials of a sweep share one twin.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["ideal", "calibrated", "mlp", "residual"] = "ideal"
    samples: int = Field(default=4096, ge=8, le=10_000_000, description="measured rows to fit on")
    thetas: int = Field(default=64, ge=1, description="distinct parameter vectors among them")
    repeats: int = Field(default=1, ge=1, le=1000, description="measurements averaged per row")
    focus: float = Field(default=0.0, ge=0.0, le=1.0,
                         description="fraction of the parameter vectors drawn around where training is "
                                     "(at the start: the initialisation box; on refresh: the current theta)")
    focus_width: float = Field(default=0.1, gt=0.0, le=1.0,
                               description="half-width of that neighbourhood, as a fraction of the envelope's")
    holdout: float = Field(default=0.2, ge=0.0, lt=1.0, description="fraction held out to measure the twin error")
    steps: int = Field(default=600, ge=0, le=1_000_000, description="optimiser steps of the fit")
    fit_batch: int = Field(default=256, ge=1, description="rows per fitting step")
    lr: float = Field(default=0.01, gt=0.0, le=10.0, description="learning rate of the fit")
    hidden: int = Field(default=256, ge=1, le=65_536, description="mlp/residual: hidden width")
    depth: int = Field(default=2, ge=1, le=16, description="mlp/residual: hidden layers")
    calibrate: list[str] = Field(default_factory=list,
                                 description="calibrated/residual: buffers of the ideal model fitted as "
                                             "parameters (e.g. ['eta', 'coupling_error'] for oscillators)")
    io_calibration: bool = Field(default=True, description="calibrated/residual: fit per-input and "
                                 "per-output gain and offset")
    scan: dict[str, tuple[float, float, int]] = Field(
        default_factory=dict,
        description="calibrated/residual: scalar constants of the ideal model set by a grid search before "
                    "the gradient fit, name -> (low, high, points), then refined once around the best; for "
                    "constants whose fit error oscillates (e.g. shg's 'chirp'), where gradients from the "
                    "nominal value would stall in a wrong minimum")
    seed: int = Field(default=0, ge=0, description="seeds the fitting data and the fit (not the trainer's "
                                                   "seed, so the trials of a sweep share one twin)")
    cache: bool = Field(default=True, description="reuse a twin fitted before for the same device and settings")
    cache_dir: str | None = Field(default=None, description="cache folder (default $PHYSFARM_TWIN_CACHE or "
                                                            "~/.cache/physfarm/twins)")
    refresh_every: int = Field(default=0, ge=0, description="refit every this many epochs (0: never)")
    refresh_ratio: float = Field(default=0.0, ge=0.0,
                                 description="refit when the probe error exceeds this multiple of the probe "
                                             "error just after the last fit (drift); 0: off")
    refresh_threshold: float | None = Field(default=None, gt=0.0,
                                            description="refit when the probe error exceeds this value")
    refresh_samples: int | None = Field(default=None, ge=8, description="rows measured per refit "
                                        "(default: samples)")

    @model_validator(mode="before")
    @classmethod
    def _kind_shorthand(cls, value):
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _sizes(self) -> "TwinConfig":
        if self.thetas > self.samples:
            raise ValueError(f"thetas ({self.thetas}) must not exceed samples ({self.samples})")
        for name, (low, high, points) in self.scan.items():
            if not (high > low and points >= 2):
                raise ValueError(f"twin.scan['{name}'] = ({low}, {high}, {points}): needs low < high and "
                                 f"points >= 2, e.g. (0.0, 300.0, 600)")
        return self

    @property
    def fitted(self) -> bool:
        return self.kind != "ideal"


def check_readout_list(readout, empty: bool = True) -> None:
    """A `readout` given as indices: distinct, >= 0 (and, with empty=False, at least one)."""
    if isinstance(readout, list) and ((not readout and not empty) or len(set(readout)) != len(readout)
                                      or min(readout, default=0) < 0):
        raise ValueError(f"readout: a list of distinct output indices >= 0, got {readout}")


class LayerConfig(BaseModel):
    """One physical layer of a PNN (`train.layers[i]`), where layers differ (devices, initialisation)."""

    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(default=None, description="the pool device this layer runs on (default: "
                               "train.device)")
    theta_init_scale: float | None = Field(default=None, ge=0.0, le=1.0,
                                           description="default: train.theta_init_scale")
    connect: Literal["tile", "pad"] = Field(
        default="tile", description="how the previous layer's outputs meet this layer's inputs when this "
        "layer has more: repeated cyclically, or padded with zeros (e.g. the PAT authors' 10 'class "
        "oscillators' starting at rest); never cut: more outputs than inputs is refused")


class PATConfig(TrainerConfig):
    """Physics-aware training of a PNN: physical layers with element-wise affine rescaling between."""

    method: Literal["pat"] = "pat"
    # Defaults chosen on validation by bench/recorded.py --choose (a small measured data set, as a lab's
    # first one is; bench/results/defaults-pat.json): 5 epochs of 64-row batches left PAT near chance.
    epochs: int = Field(default=30, ge=1, le=100_000)
    batch_size: int = Field(default=16, ge=1, le=65_536)
    n_layers: int = Field(default=1, ge=1, le=16, description="physical layers in series")
    layers: list[LayerConfig] | None = Field(
        default=None, min_length=1, max_length=16,
        description="one entry per physical layer (device, theta_init_scale, connect); sets n_layers")
    encoder: EncoderConfig | None = Field(
        default=None, description="how the data meet the first layer: tile, pad, downsample, patches, linear "
        "(default: tile where the features fit the device's inputs; more features are refused)")
    readout: Literal["auto", "first", "last", "vary_most"] | list[int] = Field(
        default="auto", description="which outputs of the last physical layer are read for the classes: "
        "auto (the first n_classes unless one of them never varies on a calibration batch, then "
        "vary_most), first or last n_classes, vary_most (the n_classes that vary most on a calibration "
        "batch measured before training), or a list of n_classes output indices")
    augment: Literal["none", "hflip"] = Field(default="none", description="training augmentation: hflip "
                                             "mirrors half of each batch's images left-right (images only)")
    theta_init_scale: float = Field(default=0.1, ge=0.0, le=1.0,
                                    description="theta starts uniform in this fraction of the envelope")
    readout_scale: float = Field(default=5.0, gt=0.0, description="initial gain of the readout rescaling")
    input_window: tuple[float, float] = Field(default=(0.0, 1.0),
                                              description="fraction of the device's input range the "
                                                          "features [0, 1] are mapped onto at the start")
    rescale_init: Literal["fixed", "data"] = Field(
        default="fixed", description="fixed: rescalings start as identity and readout_scale; data: set "
        "from one measured batch (readout standardised, later layers' inputs spanning the input range)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="cosine: the learning rate decays to lr/20 over the epochs")
    hybrid: bool = Field(default=False, description="digital linear layers (not only element-wise "
                         "rescaling) between the physical layers: a hybrid physical-digital network")
    twin: TwinConfig = Field(default_factory=TwinConfig,
                             description="the digital twin for the backward pass (a kind name or a mapping)")
    init_from: str | None = Field(
        default=None, description="warm start: a checkpoint folder (holding state.pt) or a state.pt file of "
        "the same network, e.g. an in-silico training's; training starts from its weights selected by "
        "validation (readout choice and rescalings included), with a fresh optimizer and epoch count")

    @model_validator(mode="after")
    def _window(self) -> "PATConfig":
        lo, hi = self.input_window
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"input_window must be (low, high) with 0 <= low < high <= 1, got ({lo}, {hi})")
        if self.layers is not None:
            if "n_layers" in self.model_fields_set and self.n_layers != len(self.layers):
                raise ValueError(f"n_layers ({self.n_layers}) differs from the {len(self.layers)} entries of "
                                 f"layers; drop n_layers (layers sets it)")
            self.n_layers = len(self.layers)
            if self.device is None:
                self.device = self.layers[0].device
        check_readout_list(self.readout)
        return self

    def layer_devices(self) -> list[str | None]:
        """The device name of each physical layer."""
        if self.layers is None:
            return [self.device] * self.n_layers
        return [layer.device or self.device for layer in self.layers]

    def layer_init_scales(self) -> list[float]:
        if self.layers is None:
            return [self.theta_init_scale] * self.n_layers
        return [self.theta_init_scale if lc.theta_init_scale is None else lc.theta_init_scale
                for lc in self.layers]

    def layer_connects(self) -> list[str]:
        return ["tile"] * self.n_layers if self.layers is None else [lc.connect for lc in self.layers]


class InSilicoConfig(PATConfig):
    """The in-silico baseline: the same network trained on the twin alone (forward and backward), then
    evaluated on the device; the gap to PAT is the simulation-reality gap."""

    method: Literal["insilico"] = "insilico"  # type: ignore[assignment]
    device_val: Literal["every_epoch", "selected"] = Field(
        default="every_epoch", description="every_epoch: the validation split is measured on the device each "
        "epoch and selects the checkpoint; selected: epochs are selected on the twin's validation accuracy and "
        "the device measures the validation split once, on the selected weights, after the last epoch (one "
        "device pass in all: the multifidelity sweep's screen)")


class DigitalConfig(TrainerConfig):
    """A plain digital MLP (no device in the loop), sized like the PNN it is compared with."""

    method: Literal["digital"] = "digital"
    hidden: int | None = Field(default=None, ge=1, le=65_536,
                               description="hidden width (default: about the PNN's parameter count)")
    depth: int = Field(default=1, ge=1, le=16, description="hidden layers")
    pnn_layers: int = Field(default=1, ge=1, le=16,
                            description="physical layers of the PNN whose parameter count is matched")
    weight_decay: float = Field(default=0.0, ge=0.0)


class PhyLLConfig(TrainerConfig):
    """Physical local learning: fixed physical transforms, local digital layers, forward passes only."""

    method: Literal["phyll"] = "phyll"
    # Defaults chosen on validation by bench/recorded.py --choose (bench/results/defaults-phyll.json).
    epochs: int = Field(default=30, ge=1, le=100_000)
    n_blocks: int = Field(default=2, ge=1, le=16, description="physical blocks in series")
    width: int | None = Field(default=None, ge=1, le=65_536,
                              description="outputs of each block's linear layer (default: the device's n_inputs)")
    skip: bool = Field(default=False, description="the linear layer also sees the block's device input")
    inner_steps: int = Field(default=10, ge=1, le=1000,
                             description="optimiser steps per minibatch on one measurement")
    alpha: float = Field(default=4.0, gt=0.0, description="sharpness of the goodness-difference loss")
    theta_scale: float = Field(default=0.5, ge=0.0, le=1.0,
                               description="fixed theta uniform in this fraction of the envelope, around its centre")
    weight_decay: float = Field(default=0.0, ge=0.0, description="L2 penalty on the digital weights")
    unsupervised: bool = Field(default=False,
                               description="self-contrastive negatives and a linear readout on learned features")
    readout_epochs: int = Field(default=5, ge=1, le=1000,
                                description="unsupervised: passes of the readout over the features per epoch")
    readout_lr: float = Field(default=0.01, gt=0.0, le=10.0, description="unsupervised: readout learning rate")
    train_eval_size: int = Field(default=256, ge=0,
                                 description="supervised: training samples whose accuracy is measured each "
                                             "epoch (on the device; 0 = none, reported as NaN)")
    readout: Literal["auto", "all"] | list[int] = Field(
        default="auto", description="which device outputs the blocks' linear layers read: auto (all but "
        "those that never vary at the block's first measurement), all, or a list of output indices")
    encoder: EncoderConfig | None = Field(
        default=None, description="how the data meet the device: tile, pad or downsample (fixed maps; "
        "PhyLL trains no encoder); default tile where the features fit, more features are refused")
    in_silico: bool = Field(
        default=False, description="train with the twin (`twin`) standing in for the device: every forward "
        "pass of training and of the per-epoch validation goes to the twin, epochs are selected on the twin's "
        "validation, and the device measures the validation split once, on the selected weights, after the "
        "last epoch (and the test split, with final_test). The device is used for that pass and for any twin "
        "data collection only (the multifidelity sweep's screen)")
    twin: TwinConfig = Field(default_factory=TwinConfig,
                             description="the twin that stands in for the device with in_silico (a kind name "
                                         "or a mapping, as PAT's); unused otherwise")
    init_from: str | None = Field(
        default=None, description="warm start: a checkpoint folder (holding state.pt) or a state.pt file of a "
        "PhyLL training with the same blocks, width and device, e.g. an in_silico one; training starts from "
        "its weights selected by validation (theta and goodness vectors included) with a fresh optimizer and "
        "epoch count. Each block's feature standardisation is measured again at its first measurement")

    @model_validator(mode="after")
    def _encoder_kind(self) -> "PhyLLConfig":
        check_readout_list(self.readout, empty=False)
        if self.encoder is not None and self.encoder.kind in ("patches", "linear"):
            raise ValueError(f"encoder: '{self.encoder.kind}' is not available to PhyLL (its blocks see one "
                             f"device row per sample and train nothing before the device); use tile, pad "
                             f"or downsample")
        return self
