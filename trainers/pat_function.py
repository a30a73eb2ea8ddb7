"""The physics-aware training autograd function (Wright et al., Nature 601, 549, 2022).

Forward: the device's measured output. Backward: the vector-Jacobian product of the differentiable
twin, evaluated at the inputs and parameters that were sent to the device.

Overlap (the default): when a gradient will be needed, the forward sends the device call without
waiting (`trainers.inflight.begin_forward`), evaluates the twin at the same (x, theta) with its
graph kept while the call is in flight, then collects the device's answer; the backward only walks
that graph. Through a device actor on another core the twin's forward is then hidden behind the
round trip (issue 19, P3). The plain order (device, then the twin's forward inside backward) gives the
same gradients, bit for bit (tests/test_pat_oracle.py); it is kept for `overlap=False` and for a
second backward through the same output.
"""
from __future__ import annotations

import torch

from .inflight import begin_forward


class PATFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, theta: torch.Tensor, device, twin: torch.nn.Module,
                overlap: bool = True) -> torch.Tensor:
        # x: [B, n_inputs], theta: [n_params]; the device sees detached float32 values.
        need_x, need_theta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.twin = twin
        ctx.graph = None
        if overlap and (need_x or need_theta):
            pending = begin_forward(device, x.detach(), theta.detach())
            try:
                ctx.graph = _twin_graph(twin, x, theta, need_x, need_theta)
            except BaseException:
                pending.cancel()
                raise
            y = pending.result()
        else:
            y = device.forward(x.detach(), theta.detach())
        y = torch.as_tensor(y, dtype=x.dtype)
        ctx.save_for_backward(x, theta)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, theta = ctx.saved_tensors
        need_x, need_theta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_theta):
            return None, None, None, None, None
        graph, ctx.graph = ctx.graph, None  # walked once; a second backward rebuilds it
        with torch.enable_grad():
            xs, ts, y = graph if graph is not None else _twin_graph(ctx.twin, x, theta, need_x, need_theta)
            wrt = [t for t, need in ((xs, need_x), (ts, need_theta)) if need]
            grads = list(torch.autograd.grad(y, wrt, grad_y))
        grad_x = grads.pop(0) if need_x else None
        grad_theta = grads.pop(0) if need_theta else None
        return grad_x, grad_theta, None, None, None


def _twin_graph(twin: torch.nn.Module, x: torch.Tensor, theta: torch.Tensor, need_x: bool, need_theta: bool):
    """(xs, ts, twin(xs, ts)) with the graph from fresh leaves xs, ts (detached x, theta) kept."""
    with torch.enable_grad():
        xs = x.detach().requires_grad_(need_x)
        ts = theta.detach().requires_grad_(need_theta)
        return xs, ts, twin(xs, ts)


def pat_apply(x: torch.Tensor, theta: torch.Tensor, device, twin: torch.nn.Module,
              overlap: bool = True) -> torch.Tensor:
    # Inside forward, grad mode is always off and needs_input_grad ignores it: decide here whether a
    # backward can follow (not under no_grad / inference_mode, e.g. evaluation), else the twin's
    # forward would be computed for nothing.
    return PATFunction.apply(x, theta, device, twin, overlap and torch.is_grad_enabled())
