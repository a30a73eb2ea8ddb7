"""`physfarm eval MODEL_URI`: measure a logged network again, on a device, today.

    physfarm eval runs:/<run id>/model                      # on the model's own device(s), started now
    physfarm eval models:/quickstart/1 --device osc --address auto   # a standing device of that name
    physfarm eval runs:/<run id>/model --set drift=500       # the recorded device, drifted
    physfarm eval runs:/<run id>/model --offline             # on the twin (no device)

The device: a standing device of the model's device name in the Ray cluster (`--address`), else one
started now from the system config the model recorded, with `--set key=value` overrides (a drifted
or re-seeded copy). The data: the model's own data config (`--data-path` to read it elsewhere), its
test split unless `--split val`. An evaluation run is logged in MLflow (tagged with the model URI
and, for runs:/ URIs, a link to the training run), and the accuracy and confusion matrix printed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from .errors import ConfigError


def _devices(meta: dict, args) -> tuple[dict[str, str], list]:
    """{the model's device name: the device to measure on}, and the DeviceConfigs to start for that:
    a standing device of the name is used as it is; else, or with --set, one is started from the
    system config the model recorded (with the overrides; named <name>-eval then)."""
    from actors.instrument.server import parse_sets

    from .config import DeviceConfig, DeviceList, check_systems
    from .pool import find_device
    from .sweep import init_ray

    try:
        sets = parse_sets(args.sets)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    names = list(meta["devices"])
    if args.device and args.device not in names:
        if len(names) != 1:
            raise ConfigError(f"--device: '{args.device}' is not one of the model's devices {names}")
        names = [args.device]
    init_ray(args.address)
    to_start, where = [], {}
    for own, name in zip(meta["devices"], names):
        recorded = meta["devices"][own]
        if find_device(name) is None or sets:
            if recorded is None:
                raise ConfigError(f"--device: no device '{name}' runs in the cluster and the model recorded no "
                                  f"system config to start one; start it (physfarm devices up) or give --address")
            dev = DeviceConfig(name=f"{name}-eval" if sets else name, system={**recorded, **sets})
            check_systems(DeviceList(devices=[dev]))  # a bad --set names the field before anything starts
            to_start.append(dev)
            name = dev.name
        where[own] = name
    return where, to_start


def cmd_eval(args: argparse.Namespace) -> int:
    import mlflow
    import numpy as np

    from . import plots
    from .data import DataConfig, load_dataset
    from .mlflow_ops import MlflowWriter, tracking_uri_scope
    from .models import bind, meta_of
    from .client import DeviceClient
    from .pool import devices_started
    from .runinfo import current_user, physfarm_version
    from .tables import format_table
    from .tracking import context_tags, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        with tracking_uri_scope(uri):
            model = mlflow.pyfunc.load_model(args.model_uri)
    except Exception as err:  # noqa: BLE001 - an MLflow error: one line
        raise ConfigError(f"MODEL_URI: cannot load '{args.model_uri}' from {uri}: {str(err).splitlines()[0]}") from None
    meta = meta_of(model)
    data_cfg = dict(meta["data"])
    if args.data_path:
        data_cfg["path"] = args.data_path
    data = load_dataset(DataConfig(**data_cfg))
    x, y = (data.x_test, data.y_test) if args.split == "test" else (data.x_val, data.y_val)
    where = "the twin (offline)"
    if args.offline or meta["method"] == "digital":
        pred = model.predict(x.numpy())
    else:
        names, to_start = _devices(meta, args)
        with devices_started(to_start):
            clients = {own: DeviceClient(name, client_id="eval").connect() for own, name in names.items()}
            bind(model, clients if len(clients) > 1 else next(iter(clients.values())))
            where = ", ".join(f"device '{c.name}'" for c in clients.values())
            pred = model.predict(x.numpy())
    y_true = y.numpy().astype(np.int64)
    accuracy = float((pred == y_true).mean())
    counts = plots.confusion_counts(y_true, pred, data.n_classes)

    writer = MlflowWriter(uri, Path(tempfile.mkdtemp(prefix="physfarm-eval-"))).open()
    experiment = writer.experiment(args.experiment)
    source_run = args.model_uri.split("/")[1] if args.model_uri.startswith("runs:/") else None
    tags = {"physfarm.kind": "eval", "physfarm.model_uri": args.model_uri, "physfarm.device": where,
            **context_tags({"user": current_user(), "version": physfarm_version()})}
    if source_run:
        tags["physfarm.source_run"] = source_run
    run = writer.call("create_run", experiment_id=experiment, run_name=f"eval {args.model_uri}", tags=tags)
    params = [["model_uri", args.model_uri], ["split", args.split], ["device", where],
              *[[f"set.{s.partition('=')[0]}", s.partition("=")[2]] for s in (args.sets or [])]]
    writer.call("log_batch", run=run, params=params,
                metrics=[[f"{args.split}_accuracy", accuracy, int(time.time() * 1000), 0]])
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "confusion_matrix.png"
        plots.confusion_matrix(y_true, pred, png, f"eval on {where}", data.n_classes)
        writer.call("log_artifact", run=run, local_path=str(png), artifact_path="plots")
        npz = Path(tmp) / "predictions.npz"
        np.savez(npz, y_true=y_true, y_pred=pred)
        writer.call("log_artifact", run=run, local_path=str(npz), artifact_path="eval")
    writer.call("set_terminated", run=run, status="FINISHED")
    writer.flush(wait_s=5.0)

    n = counts.shape[0]
    table = [["true \\ pred", *[str(j) for j in range(n)]]] + [[str(i), *[str(v) for v in counts[i]]] for i in range(n)]
    print(f"{args.split}_accuracy {accuracy:.4f} on {where} ({len(y_true)} samples of {data_cfg.get('kind')})")
    print(format_table(table))
    print(f"MLflow: evaluation run {writer.resolve(run)} in experiment '{args.experiment}', store {uri}")
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a logged model (runs:/... or models:/...) on a device",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("model_uri", help="an MLflow model URI: runs:/<run id>/model or models:/<name>/<version>")
    p.add_argument("--device", default=None, help="the device to measure on (default: the model's own)")
    p.add_argument("--address", default=None, help="Ray cluster with standing devices (default: a local Ray)")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                   help="start a copy of the model's device with this system field changed, e.g. --set drift=500")
    p.add_argument("--offline", action="store_true", help="predict on the twin: no device")
    p.add_argument("--split", choices=["test", "val"], default="test", help="which split of the data (test)")
    p.add_argument("--data-path", default=None, help="read the model's data set from this path instead")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment", default="physfarm-eval", help="experiment of the evaluation run")
    p.set_defaults(func=cmd_eval)


__all__ = ["add_eval_parser", "cmd_eval"]
