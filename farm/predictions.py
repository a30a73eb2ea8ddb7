"""Test-set predictions of a trained model, for the confusion matrix.

A trainer may put them into its last reported state as `state["test_predictions"]` (predicted labels
of `data.x_test`, in order); then nothing more is measured. Otherwise the model is rebuilt from the
state and evaluated once more on the device (one extra pass over the test set, after the last
epoch, accounted in the trial's device seconds). Methods without a predictor here, or whose state
does not fit, get no confusion matrix (never an error).
"""
from __future__ import annotations

import logging

import torch

from trainers.types import Dataset

log = logging.getLogger(__name__)


@torch.no_grad()
def _pnn(config, device, data: Dataset, state: dict) -> torch.Tensor:
    from trainers.networks import PNN

    kwargs = {"hybrid": config.hybrid} if hasattr(config, "hybrid") else {}
    # The forward pass only needs the device (the twin serves the backward pass).
    model = PNN(device, None, data.n_features, data.n_classes, n_layers=config.n_layers,
                theta_init_scale=config.theta_init_scale, readout_scale=config.readout_scale, **kwargs)
    model.load_state_dict(state["model"])
    model.eval()
    out = [model(data.x_test[i : i + config.eval_batch_size]).argmax(dim=1)
           for i in range(0, data.x_test.shape[0], config.eval_batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


@torch.no_grad()
def _phyll(config, device, data: Dataset, state: dict) -> torch.Tensor:
    from trainers.phyll import PhyLLNet, predict

    spec = device.spec
    net = PhyLLNet(spec, config, data.n_features, data.n_classes, torch.Generator().manual_seed(config.seed))
    net.load_state_dict(state["model"])
    return predict(net, device, data.x_test, max(1, min(spec.max_rows, config.eval_batch_size)))


@torch.no_grad()
def _digital(config, device, data: Dataset, state: dict) -> torch.Tensor:
    from trainers.baselines import MLP

    weights = state["model"]
    hidden = weights["net.0.weight"].shape[0]
    model = MLP(data.n_features, hidden, config.depth, data.n_classes)
    model.load_state_dict(weights)
    model.eval()
    return model(data.x_test).argmax(dim=1)


PREDICTORS = {"pat": _pnn, "insilico": _pnn, "phyll": _phyll, "digital": _digital}


def test_predictions(method_name: str, config, device, data: Dataset, state: dict) -> tuple | None:
    """(y_true, y_pred) as int64 numpy arrays, or None when they cannot be had."""
    y_pred = state.get("test_predictions")
    try:
        if y_pred is None:
            fn = PREDICTORS.get(method_name)
            if fn is None:
                return None
            y_pred = fn(config, device, data, state)
        y_pred = torch.as_tensor(y_pred).to(torch.int64).reshape(-1)
        if y_pred.shape[0] != data.y_test.shape[0]:
            return None
        return data.y_test.numpy().astype("int64"), y_pred.numpy()
    except Exception as err:  # noqa: BLE001 - a confusion matrix is never worth failing a trial
        log.warning("no test predictions for method '%s': %s", method_name, err)
        return None
