"""Trained networks as MLflow models: a python_function flavour that predicts with the twin offline, or
on a device once one is bound.

Each trial's run holds `model/` (an MLflow model directory):

    MLmodel, python_env.yaml, ...   MLflow's own files (signature: float32 [-1, n_features] -> int64 [-1])
    artifacts/checkpoint.pt         the trainer's state at its selected checkpoint (weights, resolved
                                    config, twins)
    artifacts/physfarm.json         the method, data (kind, shape), and each device's system config

Use:

    import mlflow
    model = mlflow.pyfunc.load_model("runs:/<run id>/model")      # or "models:/<name>/<version>"
    labels = model.predict(x)              # x: [N, n_features] in [0, 1]; offline, on the twin(s)

    from farm.models import bind
    bind(model, DeviceClient("osc").connect())   # now measured on the device (or a simulator, or
    labels = model.predict(x)                    # {name: device} for networks on several devices)

Offline, each device is replaced by its twin: the one the trainer kept (PAT, in-silico), else the
system's ideal model built from the saved system config (PhyLL); a digital MLP needs no device.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MODEL_DIR = "model"
CODE = Path(__file__).with_name("model_code.py")  # MLflow "models from code": no pickled objects


def _layer_device_names(config) -> list[str]:
    """The distinct devices of a trainer config, in the order its layers first use them ("device"
    for a training given its device directly, without a name)."""
    names = config.layer_devices() if hasattr(config, "layer_devices") else [config.device]
    return list(dict.fromkeys(n if n is not None else "device" for n in names))


def save_model(folder: str | Path, state: dict, systems: dict[str, dict], data: dict, shape,
               example) -> Path:
    """Write an MLflow model directory `folder/model` for a checkpoint `state` (a trainer's final
    state). `systems`: {device name: its system config}; `data`: the data config (as a dict);
    `shape`: the data's DataShape; `example`: a few input rows (numpy [k, n_features])."""
    import tempfile

    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from trainers.checkpoint import selected_weights
    from trainers.registry import config_of

    config = config_of(state)
    out = Path(folder) / MODEL_DIR
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint.pt"
        keep = {"config": state["config"], "weights": selected_weights(state), "twins": state.get("twins"),
                "selection": {k: v for k, v in (state.get("selection") or {}).items() if k != "weights"}}
        torch.save(keep, checkpoint)
        meta = Path(tmp) / "physfarm.json"
        names = _layer_device_names(config) if config.method != "digital" else []
        if len(systems) == 1 and names == ["device"]:  # trained on an unnamed device: its one system
            systems = {"device": next(iter(systems.values()))}
        meta.write_text(json.dumps({
            "method": config.method,
            "data": data,
            "shape": {"n_features": shape.n_features, "n_classes": shape.n_classes,
                      "image_shape": list(shape.image_shape) if shape.image_shape else None},
            "devices": {n: systems.get(n) for n in names},
            "physfarm_version": _version(),
        }, indent=1, default=str))
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype("float32"), (-1, shape.n_features))]),
                                   outputs=Schema([TensorSpec(np.dtype("int64"), (-1,))]))
        mlflow.pyfunc.save_model(
            str(out), python_model=str(CODE), artifacts={"checkpoint": str(checkpoint), "meta": str(meta)},
            signature=signature, input_example=np.asarray(example, dtype=np.float32),
            pip_requirements=_requirements())
    return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("physfarm")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "unknown"


def _requirements() -> list[str]:
    from importlib.metadata import version

    out = []
    for dist in ("torch", "numpy", "mlflow", "pydantic"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except Exception:  # noqa: BLE001
            out.append(dist)
    return out


class PhysfarmModel:
    """The python_function model (MLflow calls load_context, then predict)."""

    def load_context(self, context) -> None:
        import torch

        from trainers.datashape import DataShape
        from trainers.registry import method

        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.checkpoint = torch.load(context.artifacts["checkpoint"], weights_only=False)
        m = method(self.meta["method"])
        self.config = m.config_class.model_validate(self.checkpoint["config"])
        shape = self.meta["shape"]
        self.shape = DataShape(shape["n_features"], shape["n_classes"],
                               tuple(shape["image_shape"]) if shape["image_shape"] else None)
        self.net = None
        self.bound = None

    # -- devices --------------------------------------------------------------------------------------
    def offline_devices(self) -> dict:
        """{device name: the twin posing as it}: the trainer's twin where it kept one, else the
        system's ideal model."""
        from actors.systems.registry import build_system
        from trainers.twin_keeper import TwinDevice
        from trainers.twins import twin_from_state

        twins = self.checkpoint.get("twins") or []
        out = {}
        for k, (name, system) in enumerate(self.meta["devices"].items()):
            if system is None:
                raise ValueError(f"the model does not record device '{name}''s system config: bind a device "
                                 f"(farm.models.bind) to predict")
            sim = build_system(system)
            saved = twins[k]["twin"] if k < len(twins) and twins[k] else None
            if saved is not None and saved.get("config") is not None:
                twin = twin_from_state(saved, sim.spec, sim.ideal_model)
            else:
                twin = sim.ideal_model()
            out[name] = TwinDevice(twin.eval(), sim.spec)
        return out

    def bind(self, device) -> None:
        """Measure on `device` from now on: one device (every layer), or {name: device}; None goes
        back to the twin."""
        self.bound = device
        self.net = None

    def _network(self):
        from trainers.registry import method

        if self.net is None:
            devices = self.bound if self.bound is not None else self.offline_devices()
            names = list(self.meta["devices"])
            if isinstance(devices, dict) and len(names) == 1:
                devices = devices[names[0]]
            if self.meta["method"] == "digital":
                devices = None
            net = method(self.meta["method"]).network(self.config, devices, self.shape)
            net.load_state_dict(self.checkpoint["weights"])
            net.eval()
            self.net, self.device = net, devices
        return self.net

    # -- prediction -----------------------------------------------------------------------------------
    def predict(self, context, model_input, params=None):
        """Labels (int64 [N]) of x (float32 [N, n_features], features in [0, 1])."""
        import torch

        from trainers.registry import method

        x = np.asarray(getattr(model_input, "values", model_input), dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.shape.n_features:
            raise ValueError(f"model input must be [rows, {self.shape.n_features}] (the features of "
                             f"{self.meta['data'].get('kind')}), got {list(x.shape)}")
        net = self._network()
        with torch.no_grad():
            labels = method(self.meta["method"]).predict(net, torch.from_numpy(x), self.config, self.device)
        return labels.numpy().astype(np.int64)


def bind(model, device) -> None:
    """Bind a loaded pyfunc model (mlflow.pyfunc.load_model) to a device: its predictions are
    measured there from now on (None: back to the twin)."""
    model.unwrap_python_model().bind(device)


def meta_of(model) -> dict:
    """What physfarm recorded with a loaded model: method, data, shape, devices."""
    return model.unwrap_python_model().meta


def save_model_from_checkpoint(checkpoint_dir: str | Path, folder: str | Path, systems: dict[str, dict],
                               data: dict) -> Path | None:
    """The MLflow model of a trial's final checkpoint folder (farm.trainable writes `state.pt` and
    `model_inputs.npz` there), written to `folder/model`; None when the folder holds no final
    checkpoint (a failed or stopped trial)."""
    import torch

    from trainers.datashape import DataShape

    checkpoint_dir = Path(checkpoint_dir)
    inputs = checkpoint_dir / "model_inputs.npz"
    if not (inputs.exists() and (checkpoint_dir / "state.pt").exists()):
        return None
    with np.load(inputs) as z:
        example = z["example"]
        image = tuple(int(v) for v in z["image_shape"]) or None
        shape = DataShape(int(z["n_features"]), int(z["n_classes"]), image)
    state = torch.load(checkpoint_dir / "state.pt", weights_only=False)
    return save_model(folder, state, systems, data, shape, example)
