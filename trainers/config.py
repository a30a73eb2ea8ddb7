"""Typed configs of the trainers. `method` selects the trainer; the farm validates a sweep's `train`
section against these before anything starts."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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


class PATConfig(TrainerConfig):
    """Physics-aware training of a PNN: physical layers with element-wise affine rescaling between."""

    method: Literal["pat"] = "pat"
    n_layers: int = Field(default=1, ge=1, le=16, description="physical layers in series")
    theta_init_scale: float = Field(default=0.1, ge=0.0, le=1.0,
                                    description="theta starts uniform in this fraction of the envelope")
    readout_scale: float = Field(default=5.0, gt=0.0, description="initial gain of the readout rescaling")
