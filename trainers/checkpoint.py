"""A training's checkpoint: what every trainer saves each epoch, and how it is restored.

The state (a dict of tensors and plain values, torch.save-able) is the same for every method:

    model        this epoch's weights (what a resume continues from)
    optimizers   {name: optimizer state}, e.g. {"main": ...} or {"block0": ..., "readout": ...}
    generator    the trainer's random generator (batch order, negatives, augmentation)
    history      one metrics dict per epoch so far
    epoch        the last finished epoch
    selection    the best validation epoch so far and its weights (`trainers.selection`)
    config       the resolved trainer config (nanoGPT's habit: a checkpoint says how it was made)
    test_predictions   after the final test pass: predicted labels of the test split
    ...          what a method adds (PAT: its twins)
"""
from __future__ import annotations

import copy

import torch


def training_state(model: torch.nn.Module, optimizers: dict, gen: torch.Generator,
                   history: list[dict], epoch: int, selection, config, weights: dict | None = None,
                   **extra) -> dict:
    """A snapshot (later epochs never change it) of one epoch's training state."""
    return copy.deepcopy({
        "model": weights if weights is not None else model.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "generator": gen.get_state(),
        "history": history,
        "epoch": int(epoch),
        "selection": selection.state(),
        "config": config.model_dump(mode="json"),
        **extra,
    })


def restore(state: dict | None, model: torch.nn.Module, optimizers: dict,
            gen: torch.Generator) -> tuple[list[dict], int]:
    """Load a checkpointed state in place; returns (history so far, last finished epoch). The
    optimizers' states hold their scheduled learning rates too. No state: ([], 0)."""
    if state is None:
        return [], 0
    model.load_state_dict(state["model"])
    saved = state["optimizers"]
    missing = set(optimizers) - set(saved)
    if missing:
        raise ValueError(f"the checkpoint has no state for optimizer(s) {sorted(missing)} (it has "
                         f"{sorted(saved)}): it was saved by another method or network; start afresh")
    for name, opt in optimizers.items():
        opt.load_state_dict(saved[name])
    gen.set_state(state["generator"])
    return list(state["history"]), int(state["epoch"])


def retune(state: dict, lrs: dict[str, float]) -> dict:
    """Put new learning rates ({optimizer name: lr}) into a checkpoint's optimizer states, in place:
    PBT restores a trial from a checkpoint with a mutated config, and torch's load_state_dict would
    otherwise bring the old rates back."""
    for name, opt_state in (state.get("optimizers") or {}).items():
        if name in lrs:
            for group in opt_state.get("param_groups", []):
                group["lr"] = float(lrs[name])
    return state


def selected_weights(state: dict) -> dict:
    """The weights a finished (or interrupted) training stands for: its best validation epoch's,
    else its last epoch's."""
    best = state.get("selection") or {}
    return best.get("weights") if best.get("weights") is not None else state["model"]


def load_init(path: str, methods: tuple[str, ...] | None = None) -> dict:
    """The state a warm start (`init_from`) begins from: `path` is a checkpoint folder holding state.pt,
    or the file. `methods`: the training methods whose checkpoints are accepted (ValueError naming
    `init_from` for another's; a state saved without its config is left to the weights' load)."""
    from pathlib import Path

    file = Path(path) / "state.pt" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ValueError(f"init_from: {path} is neither a checkpoint folder with state.pt nor a state file; "
                         f"give the folder of the training to warm-start from")
    state = torch.load(file, weights_only=False)
    made_by = (state.get("config") or {}).get("method") if isinstance(state, dict) else None
    if methods and made_by is not None and made_by not in methods:
        raise ValueError(f"init_from: {path} is a '{made_by}' training's checkpoint; this training warm-starts "
                         f"only from {' or '.join(repr(m) for m in methods)} checkpoints (the same network)")
    return state
