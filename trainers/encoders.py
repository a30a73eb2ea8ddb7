"""Input encoders: how a data set's features meet a device's inputs (a named, logged choice).

Every encoder maps x[B, F] (features in [0, 1], flat; images fold back with `image_shape`) to the
rows the first physical layer measures, u[B * copies, n_inputs], with `copies` parallel copies of
that layer per sample (1, except `patches`). Nothing is cut silently: an encoder that would drop
features refuses, naming the fix.

- `tile`: features repeated cyclically up to n_inputs (needs F <= n_inputs).
- `pad`: features, then a constant (`value`, default 0) up to n_inputs (needs F <= n_inputs).
- `downsample`: the image pooled (`mode: avg`) or subsampled (`mode: stride`, every k-th pixel) to
  `size` (H', W'), then padded (or tiled, `fill`) up to n_inputs.
- `patches`: the image cut into `patch` x `patch` tiles, each padded (or tiled) to n_inputs and fed to
  its own copy of the first physical layer (one theta shared by all copies), as in the PAT authors'
  Fashion-MNIST network; the layer's outputs come back concatenated, [B, copies * n_outputs].
- `linear`: a trainable digital projection F -> n_inputs (its weights count as digital parameters);
  it starts as the average of the features that fold onto each input (tiling's mean), so its
  outputs start in [0, 1].
"""
from __future__ import annotations

import torch
from .config import EncoderConfig

KINDS = ("tile", "pad", "downsample", "patches", "linear")


class EncoderError(ValueError):
    """An encoder that cannot map these features onto this device (the message names the fix)."""


def _fit(x: torch.Tensor, n: int, fill: str, value: float = 0.0) -> torch.Tensor:
    """Rows x[R, k] (k <= n) filled up to n: cyclic tiling, or a constant."""
    k = x.shape[1]
    if k == n:
        return x
    if fill == "tile":
        return x.repeat(1, -(-n // k))[:, :n]
    return torch.nn.functional.pad(x, (0, n - k), value=value)


def _too_many(n_features: int, n_inputs: int, device: str, what: str = "the data have") -> EncoderError:
    return EncoderError(
        f"{what} {n_features} features but device '{device}' has {n_inputs} inputs: they would be cut "
        f"off. Choose train.encoder: downsample (e.g. {{kind: downsample, size: [h, w]}} for images), "
        f"patches ({{kind: patches, patch: k}}), or linear (a trainable projection), or a device with "
        f"n_inputs >= {n_features}")


class Encoder(torch.nn.Module):
    """x[B, F] -> u[B * copies, n_inputs]."""

    kind = "tile"
    copies = 1

    def __init__(self, n_features: int, n_inputs: int):
        super().__init__()
        self.n_features, self.n_inputs = n_features, n_inputs


class Tile(Encoder):
    kind = "tile"

    def __init__(self, n_features: int, n_inputs: int, device: str = "device"):
        super().__init__(n_features, n_inputs)
        if n_features > n_inputs:
            raise _too_many(n_features, n_inputs, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fit(x, self.n_inputs, "tile")


class Pad(Encoder):
    kind = "pad"

    def __init__(self, n_features: int, n_inputs: int, value: float = 0.0, device: str = "device"):
        super().__init__(n_features, n_inputs)
        if n_features > n_inputs:
            raise _too_many(n_features, n_inputs, device)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fit(x, self.n_inputs, "pad", self.value)


def _image(image_shape, kind: str) -> tuple[int, int]:
    if image_shape is None:
        raise EncoderError(f"encoder '{kind}' needs images; this data set has no image shape (use tile, pad "
                           f"or linear for tabular data)")
    return int(image_shape[0]), int(image_shape[1])


class Downsample(Encoder):
    kind = "downsample"

    def __init__(self, n_features: int, n_inputs: int, image_shape, size: tuple[int, int], mode: str = "avg",
                 fill: str = "pad", device: str = "device"):
        super().__init__(n_features, n_inputs)
        self.h, self.w = _image(image_shape, "downsample")
        self.size, self.mode, self.fill = (int(size[0]), int(size[1])), mode, fill
        if self.size[0] > self.h or self.size[1] > self.w:
            raise EncoderError(f"encoder.size {list(size)} is larger than the images ({self.h}x{self.w})")
        if mode == "stride" and (self.h % self.size[0] or self.w % self.size[1]):
            raise EncoderError(f"encoder.size {list(size)}: mode 'stride' needs sizes that divide the image "
                               f"({self.h}x{self.w}), e.g. [{self.h // 2}, {self.w // 2}]; or use mode 'avg'")
        k = self.size[0] * self.size[1]
        if k > n_inputs:
            raise _too_many(k, n_inputs, device, f"encoder.size {list(size)} gives")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = x.reshape(-1, 1, self.h, self.w)
        if self.mode == "stride":
            small = img[:, :, :: self.h // self.size[0], :: self.w // self.size[1]]
        else:
            small = torch.nn.functional.adaptive_avg_pool2d(img, self.size)
        return _fit(small.reshape(x.shape[0], -1), self.n_inputs, self.fill)


class Patches(Encoder):
    kind = "patches"

    def __init__(self, n_features: int, n_inputs: int, image_shape, patch: int, fill: str = "pad",
                 device: str = "device"):
        super().__init__(n_features, n_inputs)
        self.h, self.w = _image(image_shape, "patches")
        if self.h % patch or self.w % patch:
            divisors = [d for d in range(1, min(self.h, self.w) + 1) if self.h % d == 0 and self.w % d == 0]
            raise EncoderError(f"encoder.patch {patch} does not divide the {self.h}x{self.w} images; use one of "
                               f"{divisors}")
        if patch * patch > n_inputs:
            raise _too_many(patch * patch, n_inputs, device, f"encoder.patch {patch} gives patches of")
        self.patch, self.fill = patch, fill
        self.copies = (self.h // patch) * (self.w // patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k = x.shape[0], self.patch
        img = x.reshape(b, self.h // k, k, self.w // k, k)  # [B, row of patches, y, col of patches, x]
        tiles = img.permute(0, 1, 3, 2, 4).reshape(b * self.copies, k * k)  # patches row-major per image
        return _fit(tiles, self.n_inputs, self.fill)


class Linear(Encoder):
    kind = "linear"

    def __init__(self, n_features: int, n_inputs: int):
        super().__init__(n_features, n_inputs)
        self.proj = torch.nn.Linear(n_features, n_inputs)
        with torch.no_grad():  # output j = mean of the features i with i % n_inputs == j (tiled cyclically)
            w = torch.zeros(n_inputs, n_features)
            if n_features >= n_inputs:
                w[torch.arange(n_features) % n_inputs, torch.arange(n_features)] = 1.0
            else:
                w[torch.arange(n_inputs), torch.arange(n_inputs) % n_features] = 1.0
            self.proj.weight.copy_(w / w.sum(dim=1, keepdim=True))
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_encoder(cfg: EncoderConfig | dict | str | None, n_features: int, n_inputs: int, image_shape=None,
                  device: str = "device") -> Encoder:
    """The encoder a config names (a config, its dict or its kind); None: tiling where the features
    fit, else an EncoderError with the fix."""
    cfg = EncoderConfig.model_validate(cfg) if cfg is not None else EncoderConfig()
    if cfg.kind == "tile":
        return Tile(n_features, n_inputs, device)
    if cfg.kind == "pad":
        return Pad(n_features, n_inputs, cfg.value, device)
    if cfg.kind == "downsample":
        return Downsample(n_features, n_inputs, image_shape, cfg.size, cfg.mode, cfg.fill, device)
    if cfg.kind == "patches":
        return Patches(n_features, n_inputs, image_shape, cfg.patch, cfg.fill, device)
    return Linear(n_features, n_inputs)
