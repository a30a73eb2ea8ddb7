"""`SystemSpec`: what a device is and the hard safe envelope it may be driven in."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SystemSpec(BaseModel):
    """Static description of one physical system (or simulator of one).

    `input_range` and `param_range` are the hard safe envelope: the device actor refuses any request
    with a value outside them, so nothing outside the envelope ever reaches the hardware.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="system kind, e.g. 'oscillators'")
    n_inputs: int = Field(ge=1, description="data inputs x per row")
    n_params: int = Field(ge=0, description="trainable physical parameters theta per row")
    n_outputs: int = Field(ge=1, description="measured outputs y per row")
    input_range: tuple[float, float] = Field(description="(low, high) allowed for every x value")
    param_range: tuple[float, float] = Field(description="(low, high) allowed for every theta value")
    max_rows: int = Field(default=256, ge=1, description="most rows the device takes in one call")
    latency_s: float = Field(default=0.0, ge=0.0, description="typical seconds per call (informative)")

    @model_validator(mode="after")
    def _ranges_ordered(self) -> "SystemSpec":
        for field in ("input_range", "param_range"):
            lo, hi = getattr(self, field)
            if not lo < hi:
                raise ValueError(f"{field} must be (low, high) with low < high, got ({lo}, {hi})")
        return self
