"""The physics-aware training autograd function (Wright et al., Nature 601, 549, 2022).

Forward: the device's measured output. Backward: the vector-Jacobian product of the differentiable
twin, evaluated at the inputs and parameters that were sent to the device.
"""
from __future__ import annotations

import torch


class PATFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, theta: torch.Tensor, device, twin: torch.nn.Module) -> torch.Tensor:
        # x: [B, n_inputs], theta: [n_params]; the device sees detached float32 values.
        y = device.forward(x.detach(), theta.detach())
        y = torch.as_tensor(y, dtype=x.dtype)
        ctx.save_for_backward(x, theta)
        ctx.twin = twin
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, theta = ctx.saved_tensors
        need_x, need_theta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_theta):
            return None, None, None, None
        with torch.enable_grad():
            xs = x.detach().requires_grad_(need_x)
            ts = theta.detach().requires_grad_(need_theta)
            y = ctx.twin(xs, ts)
            wrt = [t for t, need in ((xs, need_x), (ts, need_theta)) if need]
            grads = list(torch.autograd.grad(y, wrt, grad_y))
        grad_x = grads.pop(0) if need_x else None
        grad_theta = grads.pop(0) if need_theta else None
        return grad_x, grad_theta, None, None


def pat_apply(x: torch.Tensor, theta: torch.Tensor, device, twin: torch.nn.Module) -> torch.Tensor:
    return PATFunction.apply(x, theta, device, twin)
