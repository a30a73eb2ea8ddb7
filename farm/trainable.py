"""The one thin adapter that makes any trainer a Ray Tune trainable (and `physfarm train` reuses its
reporting without Tune).

Per epoch a trainer calls `report(metrics, state)`; the adapter adds this training's device
accounting (cumulative over the whole training, also across restores: `device_s_total`,
`queue_wait_s_total`, `device_requests_total`, `device_rows_total`) and writes a checkpoint folder:
  state.pt          everything the trainer needs to resume (tune.get_checkpoint() restores it)
  params.npz        trained theta and digital weights, for people
  twin.pt           the trainer's twin, when its state has one
  predictions.npz   y_true, y_pred of the test set: the trainer's one final pass on the checkpoint it
                    selected by validation (last epoch only)
  accounting.json   the device accounting at this checkpoint (so a restore continues the count)
  model_inputs.npz  with the final checkpoint: the data's shape and a few training rows, from which
                    the driver builds the trial's MLflow model (farm.models) without reading the data
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from actors.errors import DeviceLeasedError, QuotaExceededError

from .fidelity import at_fidelity
from .phases import mark
from .runinfo import ERROR_KEY
from .trainspec import resolve_train

# The trial's running totals (the metric names end in _total; every other counter is per epoch).
ACCOUNTING = ("device_s_total", "queue_wait_s_total", "device_requests_total", "device_rows_total")


def save_checkpoint_dir(folder: Path, state: dict, accounting: dict | None = None,
                        predictions: tuple | None = None, metrics: dict | None = None, data=None) -> None:
    import numpy as np
    import torch

    folder = Path(folder)
    if predictions is not None and data is not None:  # the final checkpoint: what the MLflow model needs
        shape = data.shape
        np.savez(folder / "model_inputs.npz", example=data.x_train[:5].numpy(),
                 n_features=shape.n_features, n_classes=shape.n_classes,
                 image_shape=np.asarray(shape.image_shape or (), dtype=np.int64))
    if metrics is not None:  # the epoch's report, so a finished trial Tune restores can report it again
        (folder / "metrics.json").write_text(json.dumps(
            {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}))
    torch.save(state, folder / "state.pt")
    model = state.get("model", {})
    arrays = {k.replace(".", "_"): v.detach().cpu().numpy() for k, v in model.items()
              if isinstance(v, torch.Tensor)}
    np.savez(folder / "params.npz", **arrays)
    twins = [t for t in (state.get("twins") or []) if t and t.get("twin") is not None]
    if twins:  # the twin of each device the trainer used (PAT, in-silico)
        torch.save(twins[0]["twin"] if len(twins) == 1 else [t["twin"] for t in twins], folder / "twin.pt")
    if predictions is not None:
        np.savez(folder / "predictions.npz", y_true=predictions[0], y_pred=predictions[1])
    if accounting is not None:
        (folder / "accounting.json").write_text(json.dumps(accounting))


def load_checkpoint(checkpoint: "tune.Checkpoint | None") -> tuple[dict | None, dict]:  # noqa: F821
    """(the trainer's state, the device accounting at the checkpoint)."""
    import torch

    if checkpoint is None:
        return None, {}
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", weights_only=False)
        acc = Path(folder) / "accounting.json"
        accounting = json.loads(acc.read_text()) if acc.exists() else {}
    return state, accounting


def test_predictions(data, state: dict | None) -> tuple | None:
    """(y_true, y_pred) of the trainer's final test pass (int64 numpy), or None before it."""
    pred = (state or {}).get("test_predictions")
    if pred is None:
        return None
    import torch

    return data.y_test.numpy().astype("int64"), torch.as_tensor(pred).to(torch.int64).numpy()


def trial_devices(train_cfg) -> list[str]:
    """The pool devices a trial uses: one per physical layer where the config names several."""
    names = train_cfg.layer_devices() if hasattr(train_cfg, "layer_devices") else [train_cfg.device]
    return list(dict.fromkeys(n for n in names if n is not None))


def connect_devices(train_cfg, client_id: str, user: str | None = None, budget=None):
    """A connected DeviceClient for the trial's device, or {name: client} when it uses several.
    Its requests carry `client_id` (the trial or run) and `user` (the person); `budget` (a
    farm.budget.BudgetGate) is asked before each device call."""
    from .client import DeviceClient

    names = trial_devices(train_cfg)
    clients = {n: DeviceClient(n, client_id=client_id, user=user, budget=budget).connect() for n in names}
    return clients[names[0]] if len(clients) == 1 else clients


class EpochReporter:
    """The trainer's `report`: adds device accounting, saves the checkpoint folder, hands both on.

    sink(metrics, folder) is called with a folder that exists only during the call.
    """

    def __init__(self, device, method_name: str, config, data, sink: Callable[[dict, Path], None],
                 accounting: dict | None = None):
        self.devices = list(device.values()) if isinstance(device, dict) else [device]
        self.method_name = method_name
        self.config = config
        self.data = data
        self.sink = sink
        self.total = {k: float((accounting or {}).get(k, 0.0)) for k in ACCOUNTING}  # from the checkpoint
        self.last_metrics: dict | None = None  # the last report's, as handed on
        self.last = self._usage()  # the actor may have served this client before (a restore)

    def _usage(self) -> dict:
        """This trial's use of its devices so far, summed over them."""
        out = {"device_s_total": 0.0, "queue_wait_s_total": 0.0, "device_requests_total": 0.0,
               "device_rows_total": 0.0}
        for device in self.devices:
            try:
                u = device.client_stats()
            except Exception:  # noqa: BLE001 - a device without accounting (e.g. a local simulator)
                u = {}
            out["device_s_total"] += float(u.get("device_s", 0.0))
            out["queue_wait_s_total"] += float(u.get("wait_s", 0.0))
            out["device_requests_total"] += float(u.get("requests", 0.0))
            out["device_rows_total"] += float(u.get("rows", 0.0))
        return out

    def _advance(self) -> dict:
        """Add what the device counted since the last look. A restarted actor takes its counts up
        again from its audit log; should a count go down all the same (a replica whose log was lost),
        what it counts now is all new."""
        now = self._usage()
        for k in ACCOUNTING:
            delta = now[k] - self.last[k]
            self.total[k] += delta if delta >= 0 else now[k]
        self.last = now
        return dict(self.total)

    def __call__(self, metrics: dict, state: dict | None) -> None:
        mark("epoch", epoch=metrics.get("epoch"))
        predictions = test_predictions(self.data, state)
        accounting = self._advance()
        # Requests this trial's process retried (actor restarts, full queues, device faults): the
        # sweep's console sums them.
        retried = sum(int(getattr(d, "retried", 0) or 0) for d in self.devices)
        metrics = dict(metrics, **accounting, device_retries=retried)
        self.last_metrics = metrics
        with tempfile.TemporaryDirectory() as folder:
            if state is not None:
                save_checkpoint_dir(Path(folder), state, accounting, predictions, metrics, self.data)
            self.sink(metrics, Path(folder) if state is not None else None)


# Errors that will happen again however often the trial is retried: a bad value or file (ValueError:
# ConfigError, DataError, TableError), a request outside the device's envelope (EnvelopeError). A trial
# meeting one ends at once (`ended_by`), instead of Tune retrying it max_failures times. A request refused
# for quota would be refused again until the quota renews, one refused for another's lease or reservation
# (policy refuse) until it ends: they end the trial the same way.
RECURRING = (ValueError, QuotaExceededError, DeviceLeasedError)


def run_trial(config: dict, data: dict, devices: list[str] | None = None, pbt: bool = False,
              user: str | None = None, metric: str | None = None, budget: str | None = None,
              arrays: dict | None = None, clients: str | None = None) -> None:
    """Tune trainable: validate this trial's train config, find the device once, train, report.

    `arrays`: the data set as the driver loaded it (farm.data.load_arrays); without it the trial loads
    `data` itself.

    A recurring error (RECURRING) is reported as the trial's last result, {ERROR_KEY: message, metric:
    NaN, device_s_total: ...}, and the trial returns: it ends once, recorded as failed by physfarm's
    callbacks and summary, where raising would have Tune retry it (and fail the same way) max_failures
    times. Any other error is raised: Tune retries it from the last checkpoint.

    budget: the sweep whose device budget (farm.budget) each device call is checked against; once it
    is spent the trial stops where it is and ends normally with what it reported and checkpointed.

    clients: the trial's client id at the devices is `<clients>/<trial id>` (default: the Tune
    experiment's name). A sweep's trials are all under `<sweep name>/`, in each of its Tune runs, which
    is what a lease held for the sweep (holder: its name) admits and what its budget counts."""
    from ray import tune

    from .budget import BudgetExhaustedError

    mark("trial_start", trial=tune.get_context().get_trial_id())
    used = {"device_s_total": 0.0}
    try:
        _run_trial(config, data, devices, pbt, used, user, budget, arrays, clients)
        mark("trial_end")
    except BudgetExhaustedError:
        # Stopped mid-epoch by the sweep's budget: its last report again, with the device seconds it
        # used since (what the trial spent in all), so the run and the leaderboard count them.
        reporter = used.get("reporter")
        if reporter is not None and reporter.last_metrics is not None:
            tune.report({**reporter.last_metrics, **reporter._advance(), "budget_stopped": 1})
        return
    except RECURRING as err:
        lines = [ln for ln in str(err).splitlines() if ln.strip()] or [""]
        tune.report({ERROR_KEY: f"{type(err).__name__}: {lines[-1]}", **({metric: float("nan")} if metric else {}),
                     "device_s_total": float(used["device_s_total"])})


def _run_trial(config: dict, data: dict, devices: list[str] | None, pbt: bool, used: dict,
               user: str | None = None, budget: str | None = None, arrays: dict | None = None,
               clients: str | None = None) -> None:
    from ray import tune

    from trainers.registry import method, retune_state

    from .budget import BudgetGate
    from .data import DataConfig, dataset_from, load_dataset

    # the multifidelity strategy's screen trains the same network in silico (farm.fidelity)
    train = resolve_train(at_fidelity(dict(config["train"]), config.get("fidelity")), list(devices or []))
    name = str(train.get("method", "pat"))
    m = method(name)
    train_cfg = m.config_class.model_validate(train)
    ctx = tune.get_context()
    client_id = f"{clients or ctx.get_experiment_name()}/{ctx.get_trial_id()}"
    device = connect_devices(train_cfg, client_id, user, BudgetGate(budget) if budget else None)
    dataset = dataset_from(arrays) if arrays is not None else load_dataset(DataConfig(**data))
    checkpoint = tune.get_checkpoint()
    state, accounting = load_checkpoint(checkpoint)
    # Under PBT a checkpoint past the last epoch is another trial's, cloned in at the end (exploit):
    # nothing is left to train and its report is not this trial's, so it is not repeated.
    final = None if pbt else _final_report(checkpoint, state, train_cfg)
    if final is not None:
        # The trial had ended when the sweep's process was killed before Tune saved that; Tune restores
        # it from its last checkpoint. It is not trained again: its last report is repeated (the MLflow
        # callback writes nothing for a run already FINISHED).
        tune.report(final)
        return
    if state is not None and pbt:
        state = retune_state(state, train_cfg)  # PBT's mutated learning rates into the checkpoint

    def sink(metrics: dict, folder: Path | None) -> None:
        if folder is None:
            tune.report(metrics)
        else:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))

    reporter = EpochReporter(device, name, train_cfg, dataset, sink, accounting)
    used["reporter"] = reporter
    mark("trial_ready", trial=ctx.get_trial_id())
    try:
        m.train(train_cfg, device, dataset, report=reporter, state=state)
    finally:
        used["device_s_total"] = reporter.total["device_s_total"]
        from .client import DeviceClient

        for client in reporter.devices:  # its connections to the devices end with the trial
            if isinstance(client, DeviceClient):
                client.close()


def _final_report(checkpoint, state: dict | None, train_cfg) -> dict | None:
    """The metrics saved with a checkpoint taken after the last epoch, else None."""
    if checkpoint is None or state is None or int(state.get("epoch", 0) or 0) < int(getattr(train_cfg, "epochs", 0) or 0):
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else None
