"""`train_pat`: physics-aware training of a PNN on any device; runs with or without Ray Tune."""
from __future__ import annotations

import time

import torch

from .config import PATConfig
from .metering import MeteredDevice
from .networks import PNN
from .types import Dataset, Report, TrainResult


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Accuracy of `model` on (x, y), the forward passes measured on the device."""
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i : i + batch_size])
        correct += int((logits.argmax(dim=1) == y[i : i + batch_size]).sum())
    return correct / max(1, x.shape[0])


def train_pat(config: PATConfig, device, data: Dataset, report: Report | None = None,
              twin: torch.nn.Module | None = None, state: dict | None = None) -> TrainResult:
    """Train a PNN with PAT: forward passes on `device`, gradients through `twin`.

    device: anything with the `Device` protocol; twin: a differentiable model with the device's
    call signature (default: the device's `ideal_model()`); state: a resumable state from `report`.
    Accuracies are measured on the device.
    """
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    metered = MeteredDevice(device)
    if twin is None:
        twin = device.ideal_model()
    model = PNN(metered, twin, data.n_features, data.n_classes, n_layers=config.n_layers,
                theta_init_scale=config.theta_init_scale, readout_scale=config.readout_scale,
                generator=gen)
    opt = make_optimizer(config.optimizer, model.parameters(), config.lr)
    history: list[dict] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        history = list(state["history"])
        start_epoch = int(state["epoch"])
    loss_fn = torch.nn.CrossEntropyLoss()
    n = data.x_train.shape[0]
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.monotonic()
        calls0, rows0 = metered.calls, metered.rows
        model.train()
        perm = torch.randperm(n, generator=gen)
        total_loss, correct = 0.0, 0
        for i in range(0, n, config.batch_size):
            idx = perm[i : i + config.batch_size]
            xb, yb = data.x_train[idx], data.y_train[idx]
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.project()  # theta never leaves the safe envelope
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        model.eval()
        test_acc = evaluate(model, data.x_test, data.y_test, config.eval_batch_size)
        metrics = {
            "epoch": epoch,
            "loss": total_loss / n,
            "train_accuracy": correct / n,  # measured on the device during training
            "test_accuracy": test_acc,
            "epoch_s": time.monotonic() - t0,
            "device_calls": metered.calls - calls0,
            "device_rows": metered.rows - rows0,
        }
        history.append(metrics)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                 "history": history, "epoch": epoch}
        if report is not None:
            report(dict(metrics), state)
    last = history[-1] if history else {"test_accuracy": 0.0, "train_accuracy": 0.0}
    params = {k: v.numpy() for k, v in model.physical_params().items()}
    params.update({k: v.detach().numpy().copy() for k, v in model.named_parameters() if "theta" not in k})
    return TrainResult(test_accuracy=last["test_accuracy"], train_accuracy=last["train_accuracy"],
                       epochs=len(history), history=history, params=params, state=state)
