"""Optimisers and learning-rate schedules shared by the trainers."""
from __future__ import annotations

import math

import torch


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum 0.9."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def epoch_lr(config, epoch: int) -> float:
    """The learning rate of `epoch` (1-based): constant, or cosine from lr down to lr/20."""
    if getattr(config, "lr_schedule", "constant") != "cosine" or config.epochs <= 1:
        return config.lr
    frac = (epoch - 1) / (config.epochs - 1)
    low = config.lr / 20
    return low + 0.5 * (config.lr - low) * (1 + math.cos(math.pi * frac))
