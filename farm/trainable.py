"""The one thin adapter that makes any trainer a Ray Tune trainable."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from ray import tune

from trainers.registry import method

from .client import DeviceClient
from .data import DataConfig, load_dataset


def save_checkpoint_dir(folder: Path, state: dict) -> None:
    """state.pt (to resume) and params.npz (trained theta and digital weights, for people)."""
    torch.save(state, folder / "state.pt")
    model = state.get("model", {})
    arrays = {k.replace(".", "_"): v.detach().cpu().numpy() for k, v in model.items()
              if isinstance(v, torch.Tensor)}
    np.savez(folder / "params.npz", **arrays)


def load_checkpoint_state(checkpoint: tune.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / "state.pt", weights_only=False)


def run_trial(config: dict, data: dict) -> None:
    """Tune trainable: validate this trial's train config, find the device once, train, report."""
    m = method(config["train"].get("method", "pat"))
    train_cfg = m.config_class.model_validate(config["train"])
    ctx = tune.get_context()
    client_id = f"{ctx.get_experiment_name()}/{ctx.get_trial_id()}"
    device = DeviceClient(train_cfg.device, client_id=client_id).connect()
    dataset = load_dataset(DataConfig(**data))

    def report(metrics: dict, state: dict | None) -> None:
        usage = device.client_stats()  # this trial's accounting at the device
        metrics = dict(metrics, device_s=usage["device_s"], queue_wait_s=usage["wait_s"],
                       device_requests=usage["requests"])
        if state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint_dir(Path(folder), state)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    m.train(train_cfg, device, dataset, report=report, state=load_checkpoint_state(tune.get_checkpoint()))
