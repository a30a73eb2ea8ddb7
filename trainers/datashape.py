"""What a network needs to know of its data before any sample is seen (no torch: the farm's config
check reads it from file headers)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataShape:
    n_features: int
    n_classes: int
    image_shape: tuple[int, int] | None = None
