"""Physical neural networks built from physical layers."""
from __future__ import annotations

import torch

from .layers import ElementwiseAffine, PhysicalLayer


def tile_to(x: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat features cyclically (or truncate) so x[B, k] becomes x[B, n]."""
    k = x.shape[1]
    if k == n:
        return x
    reps = -(-n // k)
    return x.repeat(1, reps)[:, :n]


class PNN(torch.nn.Module):
    """Physical layers with only element-wise affine digital rescaling between them, read out from
    the first n_classes physical outputs of the last layer (the physics must do the work).

    x[B, n_features] in [0, 1] -> tile to n_inputs -> affine -> layer -> ... -> y[:, :n_classes]
    -> affine -> logits[B, n_classes].
    """

    def __init__(self, device, twin, n_features: int, n_classes: int, n_layers: int = 1,
                 theta_init_scale: float = 0.1, readout_scale: float = 5.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        spec = device.spec
        if n_classes > spec.n_outputs:
            raise ValueError(
                f"the device '{spec.name}' has {spec.n_outputs} outputs but the data set has {n_classes} "
                f"classes; a PNN reads one output per class: use a device with n_outputs >= {n_classes}"
            )
        lo, hi = spec.input_range
        self.rescale = torch.nn.ModuleList()
        self.layers = torch.nn.ModuleList()
        for i in range(n_layers):
            # First layer: features in [0, 1] span the input range; later ones start as identity.
            scale, bias = ((hi - lo), lo) if i == 0 else (1.0, 0.0)
            self.rescale.append(ElementwiseAffine(spec.n_inputs, scale, bias))
            self.layers.append(PhysicalLayer(device, twin, theta_init_scale, generator))
        self.readout = ElementwiseAffine(n_classes, scale=readout_scale)
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for rescale, layer in zip(self.rescale, self.layers):
            h = layer(rescale(tile_to(h, layer.spec.n_inputs)))
        return self.readout(h[:, : self.n_classes])

    def project(self) -> None:
        for layer in self.layers:
            layer.project()

    def physical_params(self) -> dict[str, torch.Tensor]:
        return {f"theta_{i}": layer.theta.detach().clone() for i, layer in enumerate(self.layers)}
