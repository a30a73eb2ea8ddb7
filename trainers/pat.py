"""`train_pat`: physics-aware training of a PNN on any device; runs with or without Ray Tune.

Also `train_insilico` (the in-silico baseline: the same network trained on the twin alone, evaluated
on the device), which shares this loop. Twins come from `trainers.twins` (`PATConfig.twin`).
"""
from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Mapping

import torch

from .config import InSilicoConfig, PATConfig
from .metering import MeteredDevice
from .networks import PNN
from .selection import Selection, evaluate, final_pass, predict_labels
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
                 saved: dict | None, init_width: float | None = None):
        self.cfg = config.twin
        self.layers: list = []
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
            width = max(config.theta_init_scale if init_width is None else init_width, self.cfg.focus_width)
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

    def start_epoch(self, layers: list) -> None:
        """Start probing the twin on `layers` (the physical layers on this keeper's device)."""
        self.layers = layers
        self.records = [deque(maxlen=PROBE_BATCHES) for _ in layers]
        for layer in layers:
            layer.record = True

    def after_step(self) -> None:
        for rec, layer in zip(self.records, self.layers):
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

    def maybe_refresh(self, epoch: int, probe: float | None) -> bool:
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
        centres = [layer.theta.detach().clone() for layer in self.layers]
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


def layer_devices(config: PATConfig, device) -> list:
    """The device of each physical layer: `device` is one device for every layer, or a mapping
    {name: device} for layers that name theirs (`PATConfig.layers`)."""
    names = config.layer_devices()
    if isinstance(device, Mapping):
        missing = [n for n in names if n not in device]
        if missing:
            raise ValueError(f"no device given for layer device(s) {missing}; got {sorted(device)}")
        return [device[n] for n in names]
    return [device] * len(names)


def hflip(x: torch.Tensor, image_shape, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images in x[B, H*W] left-right (training augmentation)."""
    if image_shape is None:
        raise ValueError("augment: hflip needs images; this data set has no image shape")
    h, w = image_shape
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    img = x.reshape(-1, h, w)
    return torch.where(flip[:, None, None], img.flip(2), img).reshape(x.shape)


class PATRun:
    """Everything one PAT (or in-silico) training holds: the devices (metered), one twin keeper per
    distinct device, and the network. Built once, before the first epoch."""

    def __init__(self, config: PATConfig, device, data: Dataset, state: dict | None,
                 twin: torch.nn.Module | None, gen: torch.Generator):
        raw = layer_devices(config, device)
        self.distinct: list = []  # the distinct raw devices, in layer order
        for d in raw:
            if not any(d is seen for seen in self.distinct):
                self.distinct.append(d)
        self.metered = [MeteredDevice(d) for d in self.distinct]
        index = [next(i for i, seen in enumerate(self.distinct) if d is seen) for d in raw]
        scales = config.layer_init_scales()
        saved = (state or {}).get("twins") or [None] * len(self.distinct)
        self.keepers = []
        for k, m in enumerate(self.metered):
            width = max(s for s, i in zip(scales, index) if i == k)
            self.keepers.append(TwinKeeper(config, m, twin, saved[k], init_width=width))
        self.index = index  # layer -> distinct device
        self.twin_fit_calls = sum(m.calls for m in self.metered)  # twin measurements before epoch 1
        self.model = PNN([self.metered[i] for i in index], [self.keepers[i].twin for i in index],
                         data.n_features, data.n_classes, n_layers=config.n_layers, theta_init_scale=scales,
                         readout_scale=config.readout_scale, generator=gen, hybrid=config.hybrid,
                         input_window=config.input_window, image_shape=data.image_shape,
                         encoder=config.encoder, connects=config.layer_connects(), readout=config.readout)
        self.sims = [TwinDevice(k.twin, m.spec) for k, m in zip(self.keepers, self.metered)]

    def on_device(self) -> None:
        self.model.set_device([self.metered[i] for i in self.index])

    def on_twin(self) -> None:
        """In-silico: every layer measures its twin instead of its device."""
        self.model.set_device([self.sims[i] for i in self.index])

    def calls(self) -> int:
        return sum(m.calls for m in self.metered)

    def rows(self) -> int:
        return sum(m.rows for m in self.metered)

    def start_epoch(self) -> None:
        for k, keeper in enumerate(self.keepers):
            keeper.start_epoch([layer for layer, i in zip(self.model.layers, self.index) if i == k])

    def after_step(self) -> None:
        for keeper in self.keepers:
            keeper.after_step()

    def end_epoch(self, epoch: int) -> dict:
        """Probe each twin on the epoch's last minibatches, refit where due; the metrics of that."""
        self.model.record(False)
        probes, refreshed = [], 0
        for keeper in self.keepers:
            probe = keeper.probe()
            refreshed += int(keeper.maybe_refresh(epoch, probe))
            if probe is not None:
                probes.append(probe)
        out: dict = {"twin_refreshed": refreshed}
        if probes:
            out["twin_probe_error"] = sum(probes) / len(probes)
        return out

    def twin_metrics(self) -> dict:
        parts = [k.metrics() for k in self.keepers]
        out = {"twin_refreshes": sum(p["twin_refreshes"] for p in parts),
               "twin_calls": sum(p["twin_calls"] for p in parts)}
        errors = [p["twin_error"] for p in parts if "twin_error" in p]
        if errors:
            out["twin_error"] = float(sum(errors) / len(errors))
        return out

    def twin_states(self) -> dict:
        return {"twins": [k.state() for k in self.keepers]}


def _train(config: PATConfig, device, data: Dataset, report: Report | None, state: dict | None,
           twin: torch.nn.Module | None, insilico: bool) -> TrainResult:
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    run = PATRun(config, device, data, state, twin, gen)
    model = run.model
    if state is None and config.rescale_init == "data":
        # calibrate the rescalings on the first training rows, measured where the network will train
        if insilico:
            run.on_twin()
        model.data_init(data.x_train[: max(config.batch_size, 32)])
        run.on_device()
    opt = make_optimizer(config.optimizer, model.parameters(), config.lr)
    history, start_epoch = restore(state, model, opt, gen)
    selection = Selection((state or {}).get("selection"))
    counts = model.param_counts()
    resolved = config.model_dump(mode="json")
    loss_fn = torch.nn.CrossEntropyLoss()
    n = data.x_train.shape[0]
    final: dict = {}
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.monotonic()
        calls0, rows0 = run.calls(), run.rows()
        for group in opt.param_groups:
            group["lr"] = epoch_lr(config, epoch)
        model.train()
        if insilico:
            run.on_twin()
        else:
            run.start_epoch()
        perm = torch.randperm(n, generator=gen)
        total_loss, correct = 0.0, 0
        for i in range(0, n, config.batch_size):
            idx = perm[i : i + config.batch_size]
            xb, yb = data.x_train[idx], data.y_train[idx]
            if config.augment == "hflip":
                xb = hflip(xb, data.image_shape, gen)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.project()  # theta never leaves the safe envelope
            if not insilico:
                run.after_step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        extra: dict = {} if insilico else run.end_epoch(epoch)
        model.eval()
        if insilico:
            extra["val_accuracy_twin"] = evaluate(model, data.x_val, data.y_val, config.eval_batch_size)[0]
            run.on_device()
        val_acc, val_loss = evaluate(model, data.x_val, data.y_val, config.eval_batch_size)  # on the device
        selection.offer(epoch, val_acc, val_loss, model.state_dict())
        metrics = {
            "epoch": epoch,
            "loss": total_loss / n,
            # measured on the device during training (PAT); on the twin for in-silico training
            "train_accuracy": correct / n,
            "val_accuracy": val_acc,  # on the device
            "val_loss": val_loss,
            **selection.metrics(),
            "epoch_s": time.monotonic() - t0,
            "lr": opt.param_groups[0]["lr"],
            "device_calls": run.calls() - calls0,
            "device_rows": run.rows() - rows0,
            **extra,
            **run.twin_metrics(),
            **counts,
        }
        if epoch == start_epoch + 1 and run.twin_fit_calls and state is None:
            metrics["twin_fit_calls"] = run.twin_fit_calls
        weights = copy.deepcopy(model.state_dict())  # this epoch's: what a resume continues from
        if epoch == config.epochs and config.final_test:  # the one pass over the test split
            final = final_pass(selection, model.load_state_dict,
                               lambda: predict_labels(model, data.x_test, config.eval_batch_size), data.y_test)
            metrics.update({k: v for k, v in final.items() if k != "test_predictions"})
            # the epoch's device use includes its test pass
            metrics.update(device_calls=run.calls() - calls0, device_rows=run.rows() - rows0)
        history.append(metrics)
        state = {"model": weights, "optimizer": opt.state_dict(), "generator": gen.get_state(),
                 "history": history, "epoch": epoch, "selection": selection.state(), "config": resolved,
                 **run.twin_states()}
        if final:
            state["test_predictions"] = final["test_predictions"]
        if report is not None:
            report(dict(metrics), state)
    if state is None or "twins" not in state:  # nothing trained (epochs already done): still hand back
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                 "history": history, "epoch": start_epoch, "selection": selection.state(), "config": resolved,
                 **run.twin_states()}
    if history and "test_accuracy" not in history[-1] and start_epoch >= config.epochs and config.final_test:
        # resumed with its epochs done but never tested (e.g. `epochs` lowered to end a long run early)
        model.eval()
        run.on_device()
        final = final_pass(selection, model.load_state_dict,
                           lambda: predict_labels(model, data.x_test, config.eval_batch_size), data.y_test)
        history[-1].update({k: v for k, v in final.items() if k != "test_predictions"})
        state = {**state, "history": history, "test_predictions": final["test_predictions"]}
        if report is not None:
            report(dict(history[-1]), state)
    return result_of(history, selection, state, model)


def result_of(history: list[dict], selection: Selection, state: dict, model: torch.nn.Module) -> TrainResult:
    """The TrainResult of a finished (or already finished) training: test accuracy from its final pass."""
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


def train_pat(config: PATConfig, device, data: Dataset, report: Report | None = None,
              state: dict | None = None, twin: torch.nn.Module | None = None) -> TrainResult:
    """Train a PNN with PAT: forward passes on the device, gradients through the twin.

    device: anything with the `Device` protocol, or a mapping {name: device} when the config's
    `layers` name several devices; twin: a differentiable model with the device's call signature
    (default: built from `config.twin`, the device's `ideal_model()` unless a fitted kind is asked
    for); state: a resumable state from `report`.
    Per epoch: `val_accuracy`/`val_loss` measured on the device, the best epoch so far
    (`best_val_accuracy`, `best_epoch`), `twin_probe_error` (twin vs device on the last training
    minibatches), `twin_refreshes`, `twin_calls` and, for fitted twins, `twin_error` (held-out). After
    the last epoch the weights of the best validation epoch are measured once on the test split
    (`test_accuracy`, `selected_epoch`; predicted labels in the state's `test_predictions`).
    """
    return _train(config, device, data, report, state, twin, insilico=False)


def train_insilico(config: InSilicoConfig, device, data: Dataset, report: Report | None = None,
                   state: dict | None = None, twin: torch.nn.Module | None = None) -> TrainResult:
    """The in-silico baseline: train the same network on the twin alone (forward and backward), then
    measure it on the device. `val_accuracy` and `test_accuracy` are on the device (the
    simulation-reality gap shows there); `val_accuracy_twin` is the same network on the twin;
    `train_accuracy` is on the twin. The device is used only to obtain the twin (if fitted), to
    validate and for the final test pass."""
    return _train(config, device, data, report, state, twin, insilico=True)
