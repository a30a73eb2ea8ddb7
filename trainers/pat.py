"""`train_pat`: physics-aware training of a PNN on any device; runs with or without Ray Tune.

`train_insilico` (the in-silico baseline: the same network trained on the twin alone, evaluated on
the device) runs the same loop with the twin in the device's place (`OnTwin`). Twins come from
`trainers.twins` (`PATConfig.twin`) and are kept by `trainers.twin_keeper`.
"""
from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from .checkpoint import load_init, restore, selected_weights, training_state
from .config import InSilicoConfig, PATConfig
from .metering import MeteredDevice
from .networks import PNN
from .optim import epoch_lr, make_optimizer
from .results import result_of
from .selection import Selection, evaluate, final_pass, predict_labels, select_on_twin
from .twin_keeper import TwinDevice, TwinKeeper
from .types import Dataset, DataShape, Report, TrainResult


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


def build_pnn(config: PATConfig, devices: list, twins: list, shape: DataShape,
              generator: torch.Generator | None = None) -> PNN:
    """The network a PAT config describes, on one device (and twin) per layer."""
    return PNN(devices, twins, shape.n_features, shape.n_classes, n_layers=config.n_layers,
               theta_init_scale=config.layer_init_scales(), readout_scale=config.readout_scale,
               generator=generator, hybrid=config.hybrid, input_window=config.input_window,
               image_shape=shape.image_shape, encoder=config.encoder, connects=config.layer_connects(),
               readout=config.readout)


def hflip(x: torch.Tensor, image_shape, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images in x[B, H*W] left-right (training augmentation)."""
    if image_shape is None:
        raise ValueError("augment: hflip needs images; this data set has no image shape")
    h, w = image_shape
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    img = x.reshape(-1, h, w)
    return torch.where(flip[:, None, None], img.flip(2), img).reshape(x.shape)


class PNNRun:
    """What one PAT (or in-silico) training holds: its devices (metered), one twin keeper per distinct
    device, and the network. Building it measures nothing; `obtain_twins()` may."""

    def __init__(self, config: PATConfig, device, state: dict | None, twin: torch.nn.Module | None):
        raw = layer_devices(config, device)
        self.distinct: list = []  # the distinct raw devices, in layer order
        for d in raw:
            if not any(d is seen for seen in self.distinct):
                self.distinct.append(d)
        self.index = [next(i for i, seen in enumerate(self.distinct) if d is seen) for d in raw]  # layer -> device
        self.metered = [MeteredDevice(d) for d in self.distinct]
        scales = config.layer_init_scales()
        saved = (state or {}).get("twins") or [None] * len(self.distinct)
        self.keepers = [TwinKeeper(config.twin, m, twin, saved[k],
                                   init_width=max(s for s, i in zip(scales, self.index) if i == k))
                        for k, m in enumerate(self.metered)]
        self.model: PNN | None = None
        self.sims: list[TwinDevice] = []

    def obtain_twins(self) -> int:
        """Each device's twin (measuring where a fit is needed); returns the device calls spent."""
        for keeper in self.keepers:
            keeper.obtain()
        self.sims = [TwinDevice(k.twin, m.spec) for k, m in zip(self.keepers, self.metered)]
        return sum(m.calls for m in self.metered)

    def build(self, config: PATConfig, shape: DataShape, gen: torch.Generator) -> PNN:
        self.model = build_pnn(config, [self.metered[i] for i in self.index],
                               [self.keepers[i].twin for i in self.index], shape, gen)
        return self.model

    def on_device(self) -> None:
        self.model.set_device([self.metered[i] for i in self.index])

    def on_twin(self) -> None:
        """Every layer measures its twin instead of its device."""
        self.model.set_device([self.sims[i] for i in self.index])

    def calls(self) -> int:
        return sum(m.calls for m in self.metered)

    def rows(self) -> int:
        return sum(m.rows for m in self.metered)

    def twin_metrics(self) -> dict:
        parts = [k.metrics() for k in self.keepers]
        out = {"twin_refreshes_total": sum(p["twin_refreshes_total"] for p in parts),
               "twin_calls_total": sum(p["twin_calls_total"] for p in parts)}
        errors = [p["twin_error"] for p in parts if "twin_error" in p]
        if errors:
            out["twin_error"] = float(sum(errors) / len(errors))
        return out

    def twin_states(self) -> dict:
        return {"twins": [k.state() for k in self.keepers]}


class OnDevice:
    """PAT: the forward pass measures the device; each epoch the twins are probed against it on the
    last minibatches and refitted where due."""

    def prepare(self, run: PNNRun) -> None:
        run.on_device()

    def start_epoch(self, run: PNNRun) -> None:
        for k, keeper in enumerate(run.keepers):
            keeper.start_epoch([layer for layer, i in zip(run.model.layers, run.index) if i == k])

    def after_step(self, run: PNNRun) -> None:
        for keeper in run.keepers:
            keeper.after_step()

    def end_epoch(self, run: PNNRun, epoch: int, data: Dataset, config: PATConfig) -> dict:
        run.model.record(False)
        probes, refreshed = [], 0
        for keeper in run.keepers:
            probe = keeper.probe()
            refreshed += int(keeper.maybe_refresh(epoch, probe))
            if probe is not None:
                probes.append(probe)
        out: dict = {"twin_refreshed": refreshed}
        if probes:
            out["twin_probe_error"] = sum(probes) / len(probes)
        return out


class OnTwin:
    """In-silico: the network trains on its twins (forward and backward); validation and the test
    pass still measure the device (what the twin believed is `val_accuracy_twin`)."""

    def prepare(self, run: PNNRun) -> None:
        run.on_twin()

    def start_epoch(self, run: PNNRun) -> None:
        run.on_twin()

    def after_step(self, run: PNNRun) -> None:
        pass

    def end_epoch(self, run: PNNRun, epoch: int, data: Dataset, config: PATConfig) -> dict:
        run.model.eval()
        twin_acc, twin_loss = evaluate(run.model, data.x_val, data.y_val, config.eval_batch_size)
        run.on_device()
        return {"val_accuracy_twin": twin_acc, "val_loss_twin": twin_loss}


def _train(config: PATConfig, device, data: Dataset, report: Report | None, state: dict | None,
           twin: torch.nn.Module | None, mode) -> TrainResult:
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    run = PNNRun(config, device, state, twin)
    twin_fit_calls = run.obtain_twins()  # twin measurements before the first epoch
    model = run.build(config, data.shape, gen)
    setup = (run.calls(), run.rows())  # the calibration's calls count in the first epoch's device_calls
    warm = load_init(config.init_from, ("pat", "insilico")) if state is None and config.init_from else None
    if warm is not None:
        # Warm start: the other training's selected weights, its readout choice (a buffer) and
        # rescalings included; no calibration batch is measured (it would overwrite them).
        try:
            model.load_state_dict(selected_weights(warm))
        except RuntimeError as err:
            raise ValueError(f"init_from: {config.init_from} holds another network's weights ({err}); "
                             f"warm-start from a training with the same layers and data") from None
        last = (warm.get("history") or [{}])[-1]
        readout_facts = {k: last[k] for k in ("readout_outputs", "dead_outputs") if k in last}
    elif state is None:
        # One calibration batch, measured where the network will train: which outputs are read (and
        # which never vary: a dead channel is never read silently), then the rescalings if asked.
        mode.prepare(run)
        readout_facts = model.choose_readout(data.x_train[:256])
        if config.rescale_init == "data":
            model.data_init(data.x_train[: max(config.batch_size, 32)])
    else:
        last = (state.get("history") or [{}])[-1]
        readout_facts = {k: last[k] for k in ("readout_outputs", "dead_outputs") if k in last}
    run.on_device()
    opt = make_optimizer(config.optimizer, model.parameters(), config.lr)
    history, start_epoch = restore(state, model, {"main": opt}, gen)
    selection = Selection((state or {}).get("selection"))
    counts = model.param_counts()
    loss_fn = torch.nn.CrossEntropyLoss()
    n = data.x_train.shape[0]
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.monotonic()
        calls0, rows0 = setup if epoch == start_epoch + 1 else (run.calls(), run.rows())
        for group in opt.param_groups:
            group["lr"] = epoch_lr(config, epoch)
        model.train()
        mode.start_epoch(run)
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
            mode.after_step(run)
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        extra = mode.end_epoch(run, epoch, data, config)
        model.eval()
        if getattr(config, "device_val", "every_epoch") == "selected":
            val_acc, val_loss, chosen = _select_on_twin(model, selection, epoch, extra, data, config)
        else:
            val_acc, val_loss = evaluate(model, data.x_val, data.y_val, config.eval_batch_size)  # on the device
            selection.offer(epoch, val_acc, val_loss, model.state_dict())
            chosen = selection.metrics()
        metrics = {
            "epoch": epoch,
            "loss": total_loss / n,
            # measured on the device during training (PAT); on the twin for in-silico training
            "train_accuracy": correct / n,
            "val_accuracy": val_acc,  # on the device
            "val_loss": val_loss,
            **chosen,
            "epoch_s": time.monotonic() - t0,
            "device_calls": run.calls() - calls0,
            "device_rows": run.rows() - rows0,
            **extra,
            **run.twin_metrics(),
            **counts,
            **readout_facts,  # strings: the run's params
        }
        if config.lr_schedule != "constant":  # a constant rate is a param of the run, not a chart
            metrics["lr"] = opt.param_groups[0]["lr"]
        if epoch == start_epoch + 1 and twin_fit_calls and state is None:
            metrics["twin_fit_calls"] = twin_fit_calls
        weights = model.state_dict()  # this epoch's: what a resume continues from (copied below)
        final: dict = {}
        if epoch == config.epochs and config.final_test:  # the one pass over the test split
            final = final_pass(selection, model.load_state_dict,
                               lambda: predict_labels(model, data.x_test, config.eval_batch_size), data.y_test)
            metrics.update({k: v for k, v in final.items() if k != "test_predictions"})
            # the epoch's device use includes its test pass
            metrics.update(device_calls=run.calls() - calls0, device_rows=run.rows() - rows0)
        history.append(metrics)
        state = training_state(model, {"main": opt}, gen, history, epoch, selection, config, weights=weights,
                               **run.twin_states(),
                               **({"test_predictions": final["test_predictions"]} if final else {}))
        if report is not None:
            report(dict(metrics), state)
    if state is None or "twins" not in state:  # nothing trained (epochs already done): still hand back
        state = training_state(model, {"main": opt}, gen, history, start_epoch, selection, config,
                               **run.twin_states())
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


def _select_on_twin(model: PNN, selection: Selection, epoch: int, extra: dict, data: Dataset,
                    config: PATConfig) -> tuple[float, float, dict]:
    """In-silico `device_val: selected` (`trainers.selection.select_on_twin`)."""
    return select_on_twin(selection, epoch, extra["val_accuracy_twin"], extra["val_loss_twin"], model.state_dict(),
                          epoch >= config.epochs, model.load_state_dict,
                          lambda: evaluate(model, data.x_val, data.y_val, config.eval_batch_size))  # on the device


def train_pat(config: PATConfig, device, data: Dataset, report: Report | None = None,
              state: dict | None = None, twin: torch.nn.Module | None = None) -> TrainResult:
    """Train a PNN with PAT: forward passes on the device, gradients through the twin.

    device: anything with the `Device` protocol, or a mapping {name: device} when the config's
    `layers` name several devices; twin: a differentiable model with the device's call signature
    (default: built from `config.twin`, the device's `ideal_model()` unless a fitted kind is asked
    for); state: a resumable state from `report`.
    Per epoch: `val_accuracy`/`val_loss` measured on the device, the best epoch so far
    (`best_val_accuracy`, `best_epoch`), `twin_probe_error` (twin vs device on the last training
    minibatches), `twin_refreshes_total`, `twin_calls_total` and, for fitted twins, `twin_error` (held-out). After
    the last epoch the weights of the best validation epoch are measured once on the test split
    (`test_accuracy`, `selected_epoch`; predicted labels in the state's `test_predictions`).
    """
    return _train(config, device, data, report, state, twin, OnDevice())


def train_insilico(config: InSilicoConfig, device, data: Dataset, report: Report | None = None,
                   state: dict | None = None, twin: torch.nn.Module | None = None) -> TrainResult:
    """The in-silico baseline: train the same network on the twin alone (forward and backward), then
    measure it on the device. `val_accuracy` and `test_accuracy` are on the device (the
    simulation-reality gap shows there); `val_accuracy_twin` is the same network on the twin;
    `train_accuracy` is on the twin. The device is used only to obtain the twin (if fitted), to
    validate and for the final test pass."""
    return _train(config, device, data, report, state, twin, OnTwin())


# ---- the trainer contract (trainers.registry) --------------------------------------------------------
def pnn_network(config: PATConfig, device, shape: DataShape) -> PNN:
    """The network of a PAT or in-silico config on `device`, for loading a checkpoint's weights and
    predicting (the forward pass needs the devices only; no twin is obtained)."""
    devices = layer_devices(config, device)
    return build_pnn(config, devices, [None] * len(devices), shape)


@torch.no_grad()
def pnn_predict(net: PNN, x: torch.Tensor, config: PATConfig, device=None) -> torch.Tensor:
    """Predicted labels of x, measured on the devices the network was built on."""
    net.eval()
    return predict_labels(net, x, config.eval_batch_size)


def pnn_lrs(config: PATConfig) -> dict[str, float]:
    return {"main": config.lr}


__all__ = ["train_pat", "train_insilico", "pnn_network", "pnn_predict", "pnn_lrs", "selected_weights"]
