"""Baselines PAT is compared with.

- `train_insilico` (in `trainers.pat`, re-exported here): the same network trained on the twin only,
  evaluated on the device (the simulation-reality gap).
- `train_digital`: a plain digital MLP with about as many trainable parameters as the PNN it stands
  beside (no device in the loop; a reference for what the data set allows).
"""
from __future__ import annotations

import time

import torch

from .config import DigitalConfig
from .pat import make_optimizer, restore, train_insilico
from .types import Dataset, Report, TrainResult

__all__ = ["train_digital", "train_insilico", "pnn_param_count", "digital_hidden"]


def pnn_param_count(spec, n_classes: int, n_layers: int = 1) -> int:
    """Trainable parameters of a PNN on `spec`: theta and the input rescaling per layer, the readout."""
    return n_layers * (spec.n_params + 2 * spec.n_inputs) + 2 * n_classes


def digital_hidden(target: int, n_features: int, n_classes: int, depth: int) -> int:
    """The hidden width h whose MLP (n_features -> h [-> h]*(depth-1) -> n_classes) has about `target`
    parameters."""
    best, best_gap = 1, None
    for h in range(1, 8193):
        count = (n_features + 1) * h + (depth - 1) * (h + 1) * h + (h + 1) * n_classes
        gap = abs(count - target)
        if best_gap is None or gap < best_gap:
            best, best_gap = h, gap
        if count > target:
            break
    return best


class MLP(torch.nn.Module):
    def __init__(self, n_features: int, hidden: int, depth: int, n_classes: int):
        super().__init__()
        layers: list[torch.nn.Module] = []
        width = n_features
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
            width = hidden
        layers.append(torch.nn.Linear(width, n_classes))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean()) if len(y) else 0.0


def train_digital(config: DigitalConfig, device, data: Dataset, report: Report | None = None,
                  state: dict | None = None, twin: torch.nn.Module | None = None) -> TrainResult:
    """Train a digital MLP on `data`. `device` (may be None) only sizes the MLP like a PNN on it when
    `config.hidden` is not given; nothing is measured. `twin` is ignored."""
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    hidden = config.hidden
    if hidden is None:
        if device is None:
            hidden = 64
        else:
            target = pnn_param_count(device.spec, data.n_classes, config.pnn_layers)
            hidden = digital_hidden(target, data.n_features, data.n_classes, config.depth)
    model = MLP(data.n_features, hidden, config.depth, data.n_classes)
    n_weights = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(config.optimizer, model.parameters(), config.lr)
    if config.weight_decay:
        for group in opt.param_groups:
            group["weight_decay"] = config.weight_decay
    history, start_epoch = restore(state, model, opt, gen)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = data.x_train.shape[0]
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.monotonic()
        model.train()
        perm = torch.randperm(n, generator=gen)
        total_loss, correct = 0.0, 0
        for i in range(0, n, config.batch_size):
            idx = perm[i : i + config.batch_size]
            logits = model(data.x_train[idx])
            loss = loss_fn(logits, data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == data.y_train[idx]).sum())
        model.eval()
        metrics = {"epoch": epoch, "loss": total_loss / n, "train_accuracy": correct / n,
                   "test_accuracy": _accuracy(model, data.x_test, data.y_test),
                   "epoch_s": time.monotonic() - t0, "device_calls": 0, "device_rows": 0,
                   "n_weights": n_weights, "hidden": hidden}
        history.append(metrics)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                 "history": history, "epoch": epoch}
        if report is not None:
            report(dict(metrics), state)
    last = history[-1] if history else {"test_accuracy": 0.0, "train_accuracy": 0.0}
    params = {k.replace(".", "_"): v.detach().numpy().copy() for k, v in model.named_parameters()}
    return TrainResult(test_accuracy=last["test_accuracy"], train_accuracy=last["train_accuracy"],
                       epochs=len(history), history=history, params=params, state=state)
