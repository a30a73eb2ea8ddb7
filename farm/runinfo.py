"""What makes a training's MLflow run self-contained: who ran it, from which code, on which data and
devices, and a name that says what varies between the trials of a sweep."""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
from pathlib import Path

USER_ENV = "PHYSFARM_USER"


def current_user(configured: str | None = None) -> str:
    """The person a training is for: the config's, else $PHYSFARM_USER, else the OS login."""
    if configured:
        return configured
    if os.environ.get(USER_ENV):
        return os.environ[USER_ENV]
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (some containers)
        return "unknown"


def git_commit(where: str | Path | None = None) -> str | None:
    """The commit checked out where the sweep was launched (its code), or None outside a git repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where or os.getcwd(), capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def physfarm_version() -> str:
    try:
        from importlib.metadata import version

        return version("physfarm")
    except Exception:  # noqa: BLE001
        return "unknown"


# The key of the last result of a trial ended by a recurring error (farm.trainable.RECURRING).
ERROR_KEY = "trial_error"


def ended_by(result: dict | None) -> str | None:
    """The recurring error a trial ended with (its last result says so), else None."""
    return (result or {}).get(ERROR_KEY)


def run_context(cfg, name_keys: list[str] | None = None, user: str | None = None) -> dict:
    """Plain, picklable facts every run of a sweep (or `physfarm train`) carries."""
    return {
        "data": cfg.data.model_dump(mode="json"),
        "systems": {d.name: d.system for d in cfg.devices},
        "user": current_user(user),
        "git_commit": git_commit(),
        "version": physfarm_version(),
        "name_keys": list(name_keys or []),
    }


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return value.get("kind", json.dumps(value, sort_keys=True)) if "kind" in value else json.dumps(value)
    return str(value)


def pick(node: dict, path: str):
    """The value at a dotted path ("pat.lr") of a nested config, or None where it is absent."""
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_name(resolved: dict, name_keys: list[str], fallback: str) -> str:
    """`lr=0.03 seed=1`: the trial's values of what the sweep varies (the trial id when nothing does)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={_short(pick(resolved, key))}" for key in name_keys
             if pick(resolved, key) is not None]
    return " ".join(parts)[:250] or fallback


def dataset_input(data: dict, shape_note: dict | None = None) -> dict:
    """The data a run used, as an MLflow dataset: its kind and source, a digest of its config."""
    source = data.get("path") or data.get("function") or data.get("kind")
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return {"name": str(data.get("kind")), "digest": digest,
            "source_type": "local" if data.get("path") else "code", "source": json.dumps({"uri": str(source)}),
            "profile": json.dumps({"limit": data.get("limit"), "seed": data.get("seed"),
                                   "val_fraction": data.get("val_fraction"), **(shape_note or {})})}


def device_params(systems: dict, names: list[str]) -> dict:
    """{"device.<name>.<field>": value}: the system config of each device a run used."""
    out = {}
    for name in names:
        for key, value in (systems.get(name) or {}).items():
            out[f"device.{name}.{key}"] = value
    return out
