"""Time-multiplexing shared by the slot-driven systems (`plate`, `circuit`).

Such a system holds each control u = concat(x, theta) for one time slot, in an order set by
`slot_order`, and reads n_outputs values off equal windows of the whole record. These helpers map the
controls to slots and the record's samples or steps to output windows, so both systems agree on it.
"""
from __future__ import annotations

import torch

from .configs import SlotOrder, slot_order_field  # noqa: F401  (the slot-driven systems' config pieces)


def slot_permutation(n_inputs: int, n_params: int, order: str) -> torch.Tensor | None:
    """Time order of the controls u = concat(x, theta): None for concat, else the index of the control
    held in each slot, with the theta slots spread evenly between the x slots."""
    if order == "concat" or n_params == 0 or n_inputs == 0:
        return None
    n = n_inputs + n_params
    theta_slots = sorted({round((j + 0.5) * n / n_params - 0.5) for j in range(n_params)})
    perm, xi, ti = [], 0, 0
    for s in range(n):
        if ti < len(theta_slots) and s == theta_slots[ti]:
            perm.append(n_inputs + ti)
            ti += 1
        else:
            perm.append(xi)
            xi += 1
    return torch.tensor(perm)


def perm_buffer(perm: torch.Tensor | None) -> torch.Tensor:
    """`slot_permutation`'s result as a module buffer (empty for concat: no reordering)."""
    return perm if perm is not None else torch.empty(0, dtype=torch.long)


def slot_controls(x: torch.Tensor, theta: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Controls in time order: x[B, n_in], theta[B, n_params] or [n_params] -> u[B, n_slots]
    (perm: a `perm_buffer`)."""
    if theta.ndim == 1:
        theta = theta.expand(x.shape[0], -1)
    u = torch.cat([x, theta], dim=1)
    return u[:, perm] if perm.numel() else u


def window_mean(n_samples: int, n_outputs: int) -> torch.Tensor:
    """[n_samples, n_outputs] matrix averaging evenly spaced samples of the record over n_outputs
    equal windows (sample i falls in window floor(i n_outputs / n_samples))."""
    idx = (torch.arange(n_samples) * n_outputs) // n_samples
    avg = torch.nn.functional.one_hot(idx, n_outputs).to(torch.float32)
    return avg / avg.sum(0, keepdim=True)


def window_ends(n_steps: int, n_outputs: int) -> dict[int, list[tuple[int, float]]]:
    """Where the ends of n_outputs equal windows of a record of n_steps steps fall: {step k: [(output
    j, fraction f of step k), ...]}; window j ends at t_j = (j + 1) n_steps / n_outputs steps, inside
    step k at fraction f (f = 1: at the step's end)."""
    ends: dict[int, list[tuple[int, float]]] = {}
    for j in range(n_outputs):
        num = (j + 1) * n_steps  # t_j in steps = num / n_outputs
        k = -(-num // n_outputs) - 1
        ends.setdefault(k, []).append((j, (num - k * n_outputs) / n_outputs))
    return ends


__all__ = ["SlotOrder", "perm_buffer", "slot_controls", "slot_order_field", "slot_permutation",
           "window_ends", "window_mean"]
