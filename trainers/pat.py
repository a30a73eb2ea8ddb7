"""`train_pat`: physics-aware training of a PNN on any device; runs with or without Ray Tune.

Also `train_insilico` (the in-silico baseline: the same network trained on the twin alone, evaluated
on the device), which shares this loop. Twins come from `trainers.twins` (`PATConfig.twin`).
"""
from __future__ import annotations

import copy
import math
import time
from collections import deque

import torch

from .config import InSilicoConfig, PATConfig
from .metering import MeteredDevice
from .networks import PNN
from .twins import Twin, nrmse, obtain_twin, refit, twin_from_state, twin_state
from .types import Dataset, Report, TrainResult

PROBE_BATCHES = 4  # training minibatches per layer kept as the probe of twin vs device


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def restore(state: dict | None, model: torch.nn.Module, opt: torch.optim.Optimizer,
            gen: torch.Generator) -> tuple[list[dict], int]:
    """Load a checkpointed training state in place; returns (history so far, last finished epoch).
    The optimizer's state holds the scheduled learning rate too. No state: ([], 0)."""
    if state is None:
        return [], 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return list(state["history"]), int(state["epoch"])


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Accuracy of `model` on (x, y), the forward passes measured on the device."""
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i : i + batch_size])
        correct += int((logits.argmax(dim=1) == y[i : i + batch_size]).sum())
    return correct / max(1, x.shape[0])


def epoch_lr(config, epoch: int) -> float:
    """The learning rate of `epoch` (1-based): constant, or cosine from lr down to lr/20."""
    if getattr(config, "lr_schedule", "constant") != "cosine" or config.epochs <= 1:
        return config.lr
    frac = (epoch - 1) / (config.epochs - 1)
    low = config.lr / 20
    return low + 0.5 * (config.lr - low) * (1 + math.cos(math.pi * frac))


class TwinDevice:
    """A twin posing as the device (the `Device` protocol): in-silico training measures on it."""

    def __init__(self, twin: torch.nn.Module, spec):
        self.twin = twin
        self._spec = spec

    @property
    def spec(self):
        return self._spec

    @torch.no_grad()
    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return self.twin(x, theta).to(torch.float32)


class TwinKeeper:
    """Obtains a trainer's twin (given, from a saved state, from the cache or fitted now), probes it
    against the device during training and refits it on drift or on schedule."""

    def __init__(self, config: PATConfig, device: MeteredDevice, given: torch.nn.Module | None,
                 saved: dict | None):
        self.cfg = config.twin
        self.device = device
        spec = device.spec
        self.refreshes = 0
        self.calls = 0  # device calls spent on the twin (fit, verification, refits)
        self.ref_probe: float | None = None  # probe error in the first epoch after the last fit
        self.gen = torch.Generator().manual_seed(self.cfg.seed + 1)  # refresh data
        self.given = given is not None
        ideal = getattr(device, "ideal_model", None)
        if given is not None:
            self.twin = copy.deepcopy(given) if isinstance(given, Twin) else given
        elif saved is not None and (saved.get("twin") or {}).get("config") is not None:
            self.twin = twin_from_state(saved["twin"], spec, ideal)
        else:
            lo, hi = spec.param_range
            centre = torch.full((spec.n_params,), (lo + hi) / 2)
            width = max(config.theta_init_scale, self.cfg.focus_width)
            extra = {"init_width": width} if self.cfg.focus > 0 else None
            got = obtain_twin(device, self.cfg, centres=[centre], width=width, extra_key=extra)
            self.twin, self.calls = got.twin, got.calls
        if saved is not None and saved.get("twin_keeper"):
            k = saved["twin_keeper"]
            self.refreshes, self.calls, self.ref_probe = k["refreshes"], k["calls"], k["ref_probe"]
            self.gen.set_state(k["generator"])
        self.records: list[deque] = []

    @property
    def refittable(self) -> bool:
        return isinstance(self.twin, Twin) and self.twin.kind != "ideal" and self.cfg.fitted

    def error(self) -> float | None:
        info = getattr(self.twin, "info", {}) or {}
        return info.get("error")

    def start_epoch(self, model: PNN) -> None:
        self.records = [deque(maxlen=PROBE_BATCHES) for _ in model.layers]
        model.record(True)

    def after_step(self, model: PNN) -> None:
        for rec, layer in zip(self.records, model.layers):
            if layer.last is not None:
                rec.append(layer.last)

    @torch.no_grad()
    def probe(self) -> float | None:
        """Twin vs device on the last measured minibatches of each layer (no extra device calls)."""
        errors = []
        for rec in self.records:
            if not rec:
                continue
            pred = torch.cat([self.twin(x, theta) for x, theta, _ in rec])
            meas = torch.cat([y for _, _, y in rec])
            errors.append(nrmse(pred, meas))
        return sum(errors) / len(errors) if errors else None

    def maybe_refresh(self, epoch: int, probe: float | None, model: PNN) -> bool:
        """Refit if the schedule says so or the probe error grew past the thresholds."""
        if self.ref_probe is None and probe is not None:
            self.ref_probe = probe
            due = False
        else:
            due = False
            if probe is not None and self.cfg.refresh_ratio > 0 and self.ref_probe:
                due = probe > self.cfg.refresh_ratio * self.ref_probe
            if probe is not None and self.cfg.refresh_threshold is not None:
                due = due or probe > self.cfg.refresh_threshold
        if self.cfg.refresh_every and epoch % self.cfg.refresh_every == 0:
            due = True
        if not (due and self.refittable):
            return False
        centres = [layer.theta.detach().clone() for layer in model.layers]
        inputs = [x for rec in self.records for x, _, _ in rec]
        got = refit(self.twin, self.device, self.cfg, self.gen, centres,
                    torch.cat(inputs) if inputs else None)
        self.calls += got["calls"]
        self.refreshes += 1
        self.ref_probe = None  # the next epoch's probe is the new reference
        return True

    def metrics(self) -> dict:
        out = {"twin_refreshes": self.refreshes, "twin_calls": self.calls}
        err = self.error()
        if err is not None:
            out["twin_error"] = float(err)
        return out

    def state(self) -> dict:
        # A twin built from the config can be rebuilt from its state alone; one given to the trainer
        # is saved too (for people), but resuming needs it given again.
        return {"twin": twin_state(self.twin, None if self.given else self.cfg),
                "twin_keeper": {"refreshes": self.refreshes, "calls": self.calls, "ref_probe": self.ref_probe,
                                "generator": self.gen.get_state()}}


def _train(config: PATConfig, device, data: Dataset, report: Report | None, state: dict | None,
           twin: torch.nn.Module | None, insilico: bool) -> TrainResult:
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    metered = MeteredDevice(device)
    calls_before_twin = metered.calls
    keeper = TwinKeeper(config, metered, twin, state)
    first_calls = metered.calls - calls_before_twin  # twin measurements before the first epoch
    model = PNN(metered, keeper.twin, data.n_features, data.n_classes, n_layers=config.n_layers,
                theta_init_scale=config.theta_init_scale, readout_scale=config.readout_scale,
                generator=gen, hybrid=config.hybrid, input_window=config.input_window)
    sim = TwinDevice(keeper.twin, metered.spec) if insilico else None
    if state is None and config.rescale_init == "data":
        # calibrate the rescalings on the first training rows, measured where the network will train
        if insilico:
            model.set_device(sim)
        model.data_init(data.x_train[: max(config.batch_size, 32)])
        model.set_device(metered)
    opt = make_optimizer(config.optimizer, model.parameters(), config.lr)
    history, start_epoch = restore(state, model, opt, gen)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = data.x_train.shape[0]
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.monotonic()
        calls0, rows0 = metered.calls, metered.rows
        for group in opt.param_groups:
            group["lr"] = epoch_lr(config, epoch)
        model.train()
        if insilico:
            model.set_device(sim)
        else:
            keeper.start_epoch(model)
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
            if not insilico:
                keeper.after_step(model)
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        model.record(False)
        extra: dict = {}
        if not insilico:
            probe = keeper.probe()
            refreshed = keeper.maybe_refresh(epoch, probe, model)
            if probe is not None:
                extra["twin_probe_error"] = probe
            extra["twin_refreshed"] = int(refreshed)
        model.eval()
        if insilico:
            extra["test_accuracy_twin"] = evaluate(model, data.x_test, data.y_test, config.eval_batch_size)
            model.set_device(metered)
        test_acc = evaluate(model, data.x_test, data.y_test, config.eval_batch_size)
        metrics = {
            "epoch": epoch,
            "loss": total_loss / n,
            # measured on the device during training (PAT); on the twin for in-silico training
            "train_accuracy": correct / n,
            "test_accuracy": test_acc,  # on the device
            "epoch_s": time.monotonic() - t0,
            "lr": opt.param_groups[0]["lr"],
            "device_calls": metered.calls - calls0,
            "device_rows": metered.rows - rows0,
            **extra,
            **keeper.metrics(),
        }
        if epoch == start_epoch + 1 and first_calls:
            metrics["twin_fit_calls"] = first_calls
        history.append(metrics)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                 "history": history, "epoch": epoch, **keeper.state()}
        if report is not None:
            report(dict(metrics), state)
    if state is None or "twin" not in state:  # nothing trained (epochs already done): still hand back
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                 "history": history, "epoch": start_epoch, **keeper.state()}
    last = history[-1] if history else {"test_accuracy": 0.0, "train_accuracy": 0.0}
    params = {k: v.numpy() for k, v in model.physical_params().items()}
    params.update({k: v.detach().numpy().copy() for k, v in model.named_parameters() if "theta" not in k})
    return TrainResult(test_accuracy=last["test_accuracy"], train_accuracy=last["train_accuracy"],
                       epochs=len(history), history=history, params=params, state=state)


def train_pat(config: PATConfig, device, data: Dataset, report: Report | None = None,
              state: dict | None = None, twin: torch.nn.Module | None = None) -> TrainResult:
    """Train a PNN with PAT: forward passes on `device`, gradients through the twin.

    device: anything with the `Device` protocol; twin: a differentiable model with the device's call
    signature (default: built from `config.twin`, the device's `ideal_model()` unless a fitted kind is
    asked for); state: a resumable state from `report` (it holds the twin under "twin").
    Accuracies are measured on the device. Per-epoch metrics add `twin_probe_error` (twin vs device on
    the last training minibatches), `twin_refreshes`, `twin_calls` and, for fitted twins, `twin_error`
    (held-out).
    """
    return _train(config, device, data, report, state, twin, insilico=False)


def train_insilico(config: InSilicoConfig, device, data: Dataset, report: Report | None = None,
                   state: dict | None = None, twin: torch.nn.Module | None = None) -> TrainResult:
    """The in-silico baseline: train the same network on the twin alone (forward and backward), then
    measure it on the device. `test_accuracy` is on the device (the simulation-reality gap shows
    there); `test_accuracy_twin` is the same network on the twin; `train_accuracy` is on the twin.
    The device is used only to obtain the twin (if fitted) and to evaluate."""
    return _train(config, device, data, report, state, twin, insilico=True)
