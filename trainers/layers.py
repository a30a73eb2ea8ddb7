"""Torch modules: a physical layer (theta on a device) and the element-wise affine rescaling."""
from __future__ import annotations

import torch

from .pat_function import pat_apply


class PhysicalLayer(torch.nn.Module):
    """One physical layer: holds theta[n_params] and measures y = device(x, theta).

    Training through it uses PAT: the device's output forward, the twin's gradient backward.
    Inputs are clamped into the device's input range (the hardware would saturate there too).
    """

    def __init__(self, device, twin: torch.nn.Module, theta_init_scale: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__()
        # Not submodules: the device is remote/stateful and the twin's buffers are not our weights,
        # so neither belongs in this layer's state_dict.
        self.__dict__["device"] = device
        self.__dict__["twin"] = twin
        spec = device.spec
        self.spec = spec
        lo, hi = spec.param_range
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        init = mid + theta_init_scale * half * (2 * torch.rand(spec.n_params, generator=generator) - 1)
        self.theta = torch.nn.Parameter(init.to(torch.float32))
        # When `record` is on, the last (x, theta, y) this layer measured (detached): a free probe of
        # how well the twin matches the device where the training is.
        self.record = False
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.spec.input_range
        x = x.clamp(lo, hi)
        y = pat_apply(x, self.theta, self.device, self.twin)
        if self.record:
            self.last = (x.detach(), self.theta.detach().clone(), y.detach())
        return y

    def set_device(self, device) -> None:
        self.__dict__["device"] = device

    def set_twin(self, twin: torch.nn.Module) -> None:
        self.__dict__["twin"] = twin

    @torch.no_grad()
    def project(self) -> None:
        """Put theta back inside the safe envelope (a hard limit, applied after every step)."""
        lo, hi = self.spec.param_range
        self.theta.clamp_(lo, hi)


class ElementwiseAffine(torch.nn.Module):
    """y = scale * x + bias, element-wise: the only digital operation allowed between physical layers."""

    def __init__(self, n: int, scale: float = 1.0, bias: float = 0.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.full((n,), float(scale)))
        self.bias = torch.nn.Parameter(torch.full((n,), float(bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.bias
