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


class TiledLinear(torch.nn.Linear):
    """A digital linear layer [k -> n] that starts as `tile_to` (so a hybrid network starts as the PNN)."""

    def __init__(self, k: int, n: int):
        super().__init__(k, n)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[torch.arange(n), torch.arange(n) % k] = 1.0
            self.bias.zero_()


def channel_spread(h: torch.Tensor, rel_floor: float = 0.01) -> torch.Tensor:
    """Per-channel std of h[B, n] for setting gains, with channels that (nearly) never vary in the
    batch (std below `rel_floor` of the median channel's: e.g. always-blank pixels seen through a
    noiseless twin) given the median spread, so their gain is a typical one, not 1/std -> huge:
    such a gain would carry any later variation of the channel (noise, mismatch) into the network
    amplified by orders of magnitude."""
    std = h.std(0)
    typical = std.median().clamp_min(1e-6)
    return torch.where(std < rel_floor * typical, typical, std)


class PNN(torch.nn.Module):
    """Physical layers with only element-wise affine digital rescaling between them, read out from
    the first n_classes physical outputs of the last layer (the physics must do the work).

    x[B, n_features] in [0, 1] -> tile to n_inputs -> affine -> layer -> ... -> y[:, :n_classes]
    -> affine -> logits[B, n_classes].

    hybrid=True: between physical layers, a digital linear layer (outputs of one layer -> inputs of
    the next; it starts as the tiling, so the network starts as the PNN) replaces the tiling; a
    hybrid physical-digital network (not a "PNN" in TARGETS.md's sense).
    """

    def __init__(self, device, twin, n_features: int, n_classes: int, n_layers: int = 1,
                 theta_init_scale: float = 0.1, readout_scale: float = 5.0,
                 generator: torch.Generator | None = None, hybrid: bool = False,
                 input_window: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        spec = device.spec
        if n_classes > spec.n_outputs:
            raise ValueError(
                f"the device '{spec.name}' has {spec.n_outputs} outputs but the data set has {n_classes} "
                f"classes; a PNN reads one output per class: use a device with n_outputs >= {n_classes}"
            )
        lo, hi = spec.input_range
        self.hybrid = hybrid
        self.rescale = torch.nn.ModuleList()
        self.layers = torch.nn.ModuleList()
        self.mixers = torch.nn.ModuleList()
        self.readout_scale = readout_scale
        w_lo, w_hi = lo + (hi - lo) * input_window[0], lo + (hi - lo) * input_window[1]
        for i in range(n_layers):
            # First layer: features in [0, 1] span `input_window` of the input range (default all of
            # it); later ones start as identity.
            scale, bias = ((w_hi - w_lo), w_lo) if i == 0 else (1.0, 0.0)
            if hybrid and i > 0:
                self.mixers.append(TiledLinear(spec.n_outputs, spec.n_inputs))
            self.rescale.append(ElementwiseAffine(spec.n_inputs, scale, bias))
            self.layers.append(PhysicalLayer(device, twin, theta_init_scale, generator))
        self.readout = ElementwiseAffine(n_classes, scale=readout_scale)
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (rescale, layer) in enumerate(zip(self.rescale, self.layers)):
            n = layer.spec.n_inputs
            h = self.mixers[i - 1](h) if (self.hybrid and i > 0) else tile_to(h, n)
            h = layer(rescale(h))
        return self.readout(h[:, : self.n_classes])

    @torch.no_grad()
    def data_init(self, x: torch.Tensor, spread: float = 2.0) -> None:
        """Set the digital rescalings from one measured batch (a lab's gain calibration): each later
        layer's inputs map mean +- `spread` std of the previous layer's outputs onto the input range,
        and the readout standardises the class outputs (times `readout_scale`). Costs one device
        call per layer."""
        h = x
        for i, (rescale, layer) in enumerate(zip(self.rescale, self.layers)):
            n = layer.spec.n_inputs
            h = self.mixers[i - 1](h) if (self.hybrid and i > 0) else tile_to(h, n)
            if i > 0:
                lo, hi = layer.spec.input_range
                mean, std = h.mean(0), channel_spread(h)
                rescale.scale.copy_((hi - lo) / (2 * spread * std))
                rescale.bias.copy_((lo + hi) / 2 - rescale.scale * mean)
            h = layer(rescale(h))
        out = h[:, : self.n_classes]
        mean, std = out.mean(0), channel_spread(out)
        self.readout.scale.copy_(self.readout_scale / std)
        self.readout.bias.copy_(-self.readout.scale * mean)

    def project(self) -> None:
        for layer in self.layers:
            layer.project()

    def set_device(self, device) -> None:
        for layer in self.layers:
            layer.set_device(device)

    def set_twin(self, twin: torch.nn.Module) -> None:
        for layer in self.layers:
            layer.set_twin(twin)

    def record(self, on: bool = True) -> None:
        for layer in self.layers:
            layer.record = on
            if not on:
                layer.last = None

    def physical_params(self) -> dict[str, torch.Tensor]:
        return {f"theta_{i}": layer.theta.detach().clone() for i, layer in enumerate(self.layers)}
