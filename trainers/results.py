"""The `TrainResult` every trainer returns, built the same way for every method."""
from __future__ import annotations

import math

import torch

from .selection import Selection
from .types import TrainResult


def result_of(history: list[dict], selection: Selection, state: dict, model: torch.nn.Module) -> TrainResult:
    """A finished (or already finished) training's result: test accuracy from its final pass, the
    selected epoch, and the network's weights as numpy arrays (the selected ones once tested)."""
    last = history[-1] if history else {}
    if hasattr(model, "physical_params"):  # a PNN: theta_<layer>, then its digital weights
        params = {k: v.numpy() for k, v in model.physical_params().items()}
        params.update({k.replace(".", "_"): v.detach().numpy().copy() for k, v in model.named_parameters()
                       if "theta" not in k})
    else:  # everything the network holds (PhyLL's fixed theta and calibration are buffers)
        params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    best = selection.best or {}
    return TrainResult(test_accuracy=float(last.get("test_accuracy", math.nan)),
                       val_accuracy=float(best.get("val_accuracy", math.nan)),
                       best_epoch=int(best.get("epoch", 0)), train_accuracy=float(last.get("train_accuracy", math.nan)),
                       epochs=len(history), history=history, params=params, state=state)
