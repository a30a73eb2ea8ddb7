"""Physical neural networks built from physical layers."""
from __future__ import annotations

import torch

from actors.outputs import dead_outputs, output_spread

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


def _per_layer(value, n: int, what: str) -> list:
    """One value for every layer (a scalar or a list of n)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what}: {len(value)} values for {n} layers")
        return list(value)
    return [value] * n


def readout_indices(readout, n_outputs: int, n_classes: int, device: str) -> list[int]:
    """The outputs of the last physical layer read for the classes (`PATConfig.readout`); "auto" and
    "vary_most" start as the first n_classes until `PNN.choose_readout` measures."""
    if n_classes > n_outputs:
        raise ValueError(
            f"the device '{device}' gives {n_outputs} outputs but the data set has {n_classes} classes; a PNN "
            f"reads one output per class: use a device with n_outputs >= {n_classes}")
    if readout in ("first", "auto", "vary_most"):
        return list(range(n_classes))
    if readout == "last":
        return list(range(n_outputs - n_classes, n_outputs))
    idx = list(readout)
    if len(idx) != n_classes or max(idx) >= n_outputs:
        raise ValueError(f"readout: {n_classes} distinct indices below {n_outputs} needed (one per class, "
                         f"outputs of device '{device}'), got {idx}")
    return idx


def pick_readout(readout, y: torch.Tensor, n_classes: int) -> tuple[list[int], list[int]]:
    """(the outputs read, the dead outputs) from a calibration batch y [B, n_outputs] of the last
    layer: vary_most takes the n_classes with the largest spread (actors.outputs), in output order;
    auto takes the first n_classes unless one is dead, then does the same."""
    spread = output_spread(y)
    dead = dead_outputs(y)
    n = y.shape[1]
    if readout == "auto" and not set(dead) & set(range(n_classes)):
        return list(range(n_classes)), dead
    if readout in ("auto", "vary_most"):
        top = sorted(range(n), key=lambda j: (-spread[j], j))[:n_classes]
        return sorted(top), dead
    return readout_indices(readout, n, n_classes, "the last layer"), dead


def connect(h: torch.Tensor, n: int, how: str, where: str) -> torch.Tensor:
    """Outputs h[B, k] of one layer onto the n inputs of the next: never cut, filled by tiling or zeros."""
    k = h.shape[1]
    if k > n:
        raise ValueError(f"{where}: {k} outputs of the previous layer do not fit its {n} inputs; use a device "
                         f"with n_inputs >= {k} (or hybrid: true, a digital layer between)")
    if k == n:
        return h
    return tile_to(h, n) if how == "tile" else torch.nn.functional.pad(h, (0, n - k))


class PNN(torch.nn.Module):
    """Physical layers with only element-wise affine digital rescaling between them, read out from
    n_classes physical outputs of the last layer (the physics must do the work).

    x[B, F] in [0, 1] -> encoder -> u[B * copies, n_inputs] -> affine -> layer 0 -> [B, copies * n_outputs]
    -> connect (tile or zero-pad) -> affine -> layer 1 -> ... -> outputs[:, readout] -> affine -> logits.

    `device` and `twin` are one per layer (a list) or one for all layers. The encoder (default tile,
    `trainers.encoders`) never drops features; `patches` feeds parallel copies of layer 0 that share
    its theta.

    hybrid=True: between physical layers, a digital linear layer (outputs of one layer -> inputs of
    the next; it starts as the tiling, so the network starts as the PNN) replaces the connection; a
    hybrid physical-digital network (not a "PNN" in TARGETS.md's sense).
    """

    def __init__(self, device, twin, n_features: int, n_classes: int, n_layers: int = 1,
                 theta_init_scale: float | list[float] = 0.1, readout_scale: float = 5.0,
                 generator: torch.Generator | None = None, hybrid: bool = False,
                 input_window: tuple[float, float] = (0.0, 1.0), image_shape=None, encoder=None,
                 connects: list[str] | None = None, readout="first"):
        super().__init__()
        from .encoders import build_encoder

        devices = _per_layer(device, n_layers, "devices")
        twins = _per_layer(twin, n_layers, "twins")
        scales = _per_layer(theta_init_scale, n_layers, "theta_init_scale")
        self.connects = _per_layer(connects or "tile", n_layers, "connect")
        specs = [d.spec for d in devices]
        self.encoder = build_encoder(encoder, n_features, specs[0].n_inputs, image_shape, specs[0].name)
        self.hybrid = hybrid
        self.rescale = torch.nn.ModuleList()
        self.layers = torch.nn.ModuleList()
        self.mixers = torch.nn.ModuleList()
        self.readout_scale = readout_scale
        lo, hi = specs[0].input_range
        w_lo, w_hi = lo + (hi - lo) * input_window[0], lo + (hi - lo) * input_window[1]
        width = None  # outputs per sample of the previous layer
        for i, (dev, tw, spec) in enumerate(zip(devices, twins, specs)):
            if i > 0 and not hybrid and width > spec.n_inputs:
                connect(torch.zeros(1, width), spec.n_inputs, self.connects[i], f"layer {i} ('{spec.name}')")
            # First layer: features in [0, 1] span `input_window` of the input range (default all of
            # it); later ones start as identity.
            scale, bias = ((w_hi - w_lo), w_lo) if i == 0 else (1.0, 0.0)
            if hybrid and i > 0:
                self.mixers.append(TiledLinear(width, spec.n_inputs))
            self.rescale.append(ElementwiseAffine(spec.n_inputs, scale, bias))
            self.layers.append(PhysicalLayer(dev, tw, scales[i], generator))
            width = spec.n_outputs * (self.encoder.copies if i == 0 else 1)
        # A buffer: checkpoints and MLflow models keep the outputs a calibration chose.
        self.readout_how = readout
        self.register_buffer("readout_index", torch.tensor(
            readout_indices(readout, width, n_classes, specs[-1].name), dtype=torch.long))
        self._register_load_state_dict_pre_hook(self._readout_of_old_states)
        self.readout = ElementwiseAffine(n_classes, scale=readout_scale)
        self.n_classes = n_classes

    def _readout_of_old_states(self, state, prefix, *args) -> None:
        """States saved before the readout was kept in them read the outputs the config named."""
        state.setdefault(prefix + "readout_index", self.readout_index.clone())

    def _inputs(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """The inputs of layer i (before its rescaling): the encoded data, or the previous outputs."""
        if i == 0:
            return self.encoder(h)
        if self.hybrid:
            return self.mixers[i - 1](h)
        return connect(h, self.layers[i].spec.n_inputs, self.connects[i], f"layer {i}")

    def _outputs(self, i: int, y: torch.Tensor, batch: int) -> torch.Tensor:
        return y.reshape(batch, -1) if i == 0 else y  # patches: the copies' outputs side by side

    def last_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The last physical layer's outputs [B, n] for x, measured (one device call per layer)."""
        h, batch = x, x.shape[0]
        for i, (rescale, layer) in enumerate(zip(self.rescale, self.layers)):
            h = self._outputs(i, layer(rescale(self._inputs(i, h))), batch)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.last_outputs(x)[:, self.readout_index])

    @torch.no_grad()
    def choose_readout(self, x: torch.Tensor) -> dict:
        """Choose the outputs read (`readout` auto or vary_most) from the last layer's outputs on the
        calibration batch x; for any readout, say which outputs never varied there. Returns
        {"readout_outputs": "i,j,...", "dead_outputs": "k,..."} (strings: logged as the run's params)."""
        idx, dead = pick_readout(self.readout_how, self.last_outputs(x), self.n_classes)  # under no_grad
        self.readout_index.copy_(torch.tensor(idx, dtype=torch.long))
        return {"readout_outputs": ",".join(map(str, idx)), "dead_outputs": ",".join(map(str, dead)) or "none"}

    @torch.no_grad()
    def data_init(self, x: torch.Tensor, spread: float = 2.0) -> None:
        """Set the digital rescalings from one measured batch (a lab's gain calibration): each later
        layer's inputs map mean +- `spread` std of the previous layer's outputs onto the input range,
        and the readout standardises the class outputs (times `readout_scale`). Costs one device
        call per layer."""
        h, batch = x, x.shape[0]
        for i, (rescale, layer) in enumerate(zip(self.rescale, self.layers)):
            h = self._inputs(i, h)
            if i > 0:
                lo, hi = layer.spec.input_range
                mean, std = h.mean(0), channel_spread(h)
                rescale.scale.copy_((hi - lo) / (2 * spread * std))
                rescale.bias.copy_((lo + hi) / 2 - rescale.scale * mean)
            h = self._outputs(i, layer(rescale(h)), batch)
        out = h[:, self.readout_index]
        mean, std = out.mean(0), channel_spread(out)
        self.readout.scale.copy_(self.readout_scale / std)
        self.readout.bias.copy_(-self.readout.scale * mean)

    def project(self) -> None:
        for layer in self.layers:
            layer.project()

    def devices(self) -> list:
        return [layer.device for layer in self.layers]

    def set_device(self, device) -> None:
        """One device for every layer, or a list of one per layer."""
        for layer, d in zip(self.layers, _per_layer(device, len(self.layers), "devices")):
            layer.set_device(d)

    def set_twin(self, twin) -> None:
        for layer, t in zip(self.layers, _per_layer(twin, len(self.layers), "twins")):
            layer.set_twin(t)

    def record(self, on: bool = True) -> None:
        for layer in self.layers:
            layer.record = on
            if not on:
                layer.last = None

    def physical_params(self) -> dict[str, torch.Tensor]:
        return {f"theta_{i}": layer.theta.detach().clone() for i, layer in enumerate(self.layers)}

    def param_counts(self) -> dict[str, int]:
        """Trainable parameters: physical (theta of every layer) and digital (rescalings, readout,
        encoder, hybrid mixers)."""
        physical = sum(layer.theta.numel() for layer in self.layers)
        total = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"n_physical_params": physical, "n_digital_params": total - physical}
