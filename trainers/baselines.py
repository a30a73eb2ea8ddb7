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
from .checkpoint import restore, training_state
from .optim import make_optimizer
from .pat import train_insilico
from .results import result_of
from .selection import Selection, evaluate, final_pass
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
        self.hidden = hidden
        layers: list[torch.nn.Module] = []
        width = n_features
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
            width = hidden
        layers.append(torch.nn.Linear(width, n_classes))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_digital(config: DigitalConfig, device, data: Dataset, report: Report | None = None,
                  state: dict | None = None, twin: torch.nn.Module | None = None) -> TrainResult:
    """Train a digital MLP on `data`. `device` (may be None) only sizes the MLP like a PNN on it when
    `config.hidden` is not given; nothing is measured. `twin` is ignored."""
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = digital_network(config, device, data.shape)
    hidden = model.hidden
    n_weights = sum(p.numel() for p in model.parameters())
    opt = digital_optimizers(model, config)["main"]
    history, start_epoch = restore(state, model, {"main": opt}, gen)
    selection = Selection((state or {}).get("selection"))
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
        val_acc, val_loss = evaluate(model, data.x_val, data.y_val, max(1, len(data.y_val)))
        selection.offer(epoch, val_acc, val_loss, model.state_dict())
        metrics = {"epoch": epoch, "loss": total_loss / n, "train_accuracy": correct / n,
                   "val_accuracy": val_acc, "val_loss": val_loss, **selection.metrics(),
                   "epoch_s": time.monotonic() - t0, "device_calls": 0, "device_rows": 0,
                   "n_weights": n_weights, "hidden": hidden,
                   "n_physical_params": 0, "n_digital_params": n_weights}
        final: dict = {}
        weights = model.state_dict()  # this epoch's: what a resume continues from (copied below)
        if epoch == config.epochs and config.final_test:  # the one pass over the test split
            final = final_pass(selection, model.load_state_dict,
                               lambda: model(data.x_test).argmax(dim=1), data.y_test)
            metrics.update({k: v for k, v in final.items() if k != "test_predictions"})
        history.append(metrics)
        state = training_state(model, {"main": opt}, gen, history, epoch, selection, config, weights=weights,
                               **({"test_predictions": final["test_predictions"]} if final else {}))
        if report is not None:
            report(dict(metrics), state)
    return result_of(history, selection, state or {}, model)


# ---- the trainer contract (trainers.registry) --------------------------------------------------------
def digital_network(config: DigitalConfig, device, shape) -> MLP:
    """The MLP of a digital config: `hidden`, or sized like the PNN on `device` (64 without one)."""
    hidden = config.hidden
    if hidden is None:
        if device is None:
            hidden = 64
        else:
            target = pnn_param_count(device.spec, shape.n_classes, config.pnn_layers)
            hidden = digital_hidden(target, shape.n_features, shape.n_classes, config.depth)
    return MLP(shape.n_features, hidden, config.depth, shape.n_classes)


def digital_optimizers(model: MLP, config: DigitalConfig) -> dict:
    opt = make_optimizer(config.optimizer, model.parameters(), config.lr)
    if config.weight_decay:
        for group in opt.param_groups:
            group["weight_decay"] = config.weight_decay
    return {"main": opt}


def digital_lrs(config: DigitalConfig) -> dict[str, float]:
    return {"main": config.lr}


@torch.no_grad()
def digital_predict(model: MLP, x: torch.Tensor, config: DigitalConfig, device=None) -> torch.Tensor:
    model.eval()
    return model(x).argmax(dim=1)
