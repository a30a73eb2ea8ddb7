"""What trainers take and return. Trainers depend on these, never on Ray Tune or MLflow."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch

from actors.spec import SystemSpec

from .datashape import DataShape


@runtime_checkable
class Device(Protocol):
    """Anything that measures: a local simulator, or a `farm.client.DeviceClient` over Ray.

    forward(x[B, n_inputs], theta[n_params]) -> y[B, n_outputs] (float32 tensors).
    """

    @property
    def spec(self) -> SystemSpec: ...

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Dataset:
    """A classification data set in three splits. Features are scaled to [0, 1] and flat ([N, F]);
    `image_shape` (H, W) says how to fold them back into images (encoders use it). Labels are
    0..n_classes-1.

    Trainers select on the validation split; the test split is read once, by the final pass on the
    checkpoint they selected (`trainers.selection.final_pass`).
    """

    name: str
    x_train: torch.Tensor  # [N_train, n_features] float32
    y_train: torch.Tensor  # [N_train] int64
    x_val: torch.Tensor  # [N_val, n_features] float32
    y_val: torch.Tensor  # [N_val] int64
    x_test: torch.Tensor  # [N_test, n_features] float32
    y_test: torch.Tensor  # [N_test] int64
    n_classes: int
    image_shape: tuple[int, int] | None = None

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def shape(self) -> DataShape:
        return DataShape(self.n_features, self.n_classes, self.image_shape)


# report(metrics, state): called once per epoch. `state` is everything needed to resume
# (a dict of tensors and plain values, torch.save-able); the Tune adapter turns it into a checkpoint.
Report = Callable[[dict, Optional[dict]], None]


@dataclass
class TrainResult:
    test_accuracy: float  # measured on the device once, on the checkpoint selected by validation
    val_accuracy: float  # of that checkpoint
    best_epoch: int  # the epoch it was taken at
    train_accuracy: float
    epochs: int
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch
    params: dict[str, Any] = field(default_factory=dict)  # trained theta and digital weights (numpy)
    state: dict | None = None  # final resumable state
