"""The sweep config: one YAML file with devices, data, train (with search space), sweep, tracking.

`load_config(path)` validates everything before anything starts (no Ray, no MLflow, no files
written) and raises `ConfigError` with one line naming the field path and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, PrivateAttr, field_validator, model_validator

from actors.systems.registry import validate_system_config
from trainers.registry import METHODS

from .data import DataConfig
from .errors import ConfigError, format_validation_error
from .fitcheck import check_fit
from .space import samplers
from .trainspec import check_train
from .sweep_settings import SchedulerSettings, check_sweep

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class GroupQuota(BaseModel):
    model_config = ConfigDict(extra="forbid")

    members: list[str] = Field(min_length=1, description="the users whose use counts against the group's quota")
    device_s: float = Field(gt=0.0, description="device-seconds per period for the members together")


class QuotaConfig(BaseModel):
    """Device-seconds per user (or group) per period on one device (docs/pool.md "Quotas")."""

    model_config = ConfigDict(extra="forbid")

    period: Literal["hour", "day", "week"] = Field(
        default="day", description="the quota renews every hour, day (local midnight) or week (Monday 00:00)")
    users: dict[str, float] = Field(default_factory=dict, description="user -> device-seconds per period")
    groups: dict[str, GroupQuota] = Field(default_factory=dict, description="group -> members and device-seconds")
    default_s: float | None = Field(default=None, gt=0.0,
                                    description="device-seconds per period of users not named (none: no limit)")

    @field_validator("users")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        for user, seconds in v.items():
            if not seconds > 0:
                raise ValueError(f"quota of user '{user}' must be > 0 device-seconds, got {seconds!r} (leave "
                                 f"the user out for no limit)")
        return v


class PriorityConfig(BaseModel):
    """Priority classes of users on one device (docs/pool.md "Priorities")."""

    model_config = ConfigDict(extra="forbid")

    classes: list[str] = Field(default_factory=lambda: ["high", "normal"], min_length=1,
                               description="class names, served first to last")
    users: dict[str, str] = Field(default_factory=dict, description="user -> class")
    default: str | None = Field(default=None, description="class of users not named (default: the last class)")
    max_skips: int = Field(default=4, ge=0, le=1000,
                           description="a class with requests waiting goes first after this many device calls "
                                       "in a row without it (with two classes: never more than this many)")

    @model_validator(mode="after")
    def _known_classes(self):
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct, got {self.classes}")
        for user, cls in self.users.items():
            if cls not in self.classes:
                raise ValueError(f"users.{user}: class '{cls}' is not one of classes {self.classes}")
        if self.default is not None and self.default not in self.classes:
            raise ValueError(f"default: class '{self.default}' is not one of classes {self.classes}")
        return self

    def for_actor(self) -> dict:
        """{"users": {user: class number}, "default": number, "max_skips": n} (0 is served first)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return {"users": {u: index[c] for u, c in self.users.items()},
                "default": index[self.default] if self.default else len(self.classes) - 1,
                "max_skips": self.max_skips, "classes": list(self.classes)}


class DeviceConfig(BaseModel):
    """One device of the pool: a simulator, a recorded device or an instrument."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="name trials use to find the device")
    system: dict[str, Any] = Field(description="the system: {kind: oscillators, ...its fields}")
    replicas: int = Field(default=1, ge=1, le=1024, description="identical actors serving this name")
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="custom Ray resources pinning the actor to a node")
    max_restarts: int = Field(default=3, ge=-1, description="actor restarts after a crash (-1: forever)")
    max_wait_ms: float = Field(default=0.0, ge=0.0, le=1000.0,
                               description="how long a device call waits for more rows to batch")
    max_queue_rows: int = Field(default=100_000, ge=1,
                                description="rows that may wait at one replica; beyond, requests are "
                                            "refused with DeviceBusyError (backpressure)")
    node_labels: dict[str, str] = Field(default_factory=dict,
                                        description="Ray node labels the actor's node must have "
                                                    "(label_selector), e.g. {physfarm/device: optics}")
    lease_policy: Literal["refuse", "wait"] = Field(
        default="refuse", description="while leased, other clients' requests are refused or wait")
    max_lease_s: float = Field(default=86_400.0, gt=0.0, description="longest lease one holder may take")
    retries: int = Field(default=3, ge=0, le=100,
                         description="client retries of a request after an actor restart or device fault")
    retry_backoff_s: float = Field(default=0.2, ge=0.0, le=60.0,
                                   description="first retry delay; doubles on each retry")
    call_timeout_s: float = Field(default=300.0, gt=0.0,
                                  description="a forward call with no answer after this fails (not retried)")
    restart_wait_s: float = Field(default=120.0, ge=0.0,
                                  description="how long a client waits for a crashed replica to restart")
    local_channel: bool = Field(default=True,
                                description="trainers on the device's node send forward requests over a "
                                            "loopback socket into the actor (~0.35 ms a call) instead of a "
                                            "Ray call (~2.4 ms here); false: every request through Ray")
    audit_dir: str | None = Field(default=None, min_length=1,
                                  description="folder, on the device's node, of its audit log (one JSON-lines "
                                              "file per replica; default $PHYSFARM_AUDIT_DIR, else "
                                              "~/.physfarm/audit)")
    quotas: QuotaConfig | None = Field(default=None,
                                       description="device-seconds per user or group per period (none: no quotas)")
    priorities: PriorityConfig | None = Field(default=None,
                                              description="priority classes of users (none: one class, all fair)")
    _notes: list[str] = PrivateAttr(default_factory=list)  # what checking its files found (--check prints)


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str | None = Field(default=None, description="MLflow tracking URI (default: ./mlflow.db as SQLite)")
    experiment: str = Field(default="physfarm", min_length=1, description="MLflow experiment name")
    model_name: str | None = Field(default=None, min_length=1,
                                   description="registered model the sweep's best trial becomes a version of "
                                               "(default: the sweep's name)")
    user: str | None = Field(default=None, min_length=1, description="the person the runs are for (default: "
                             "$PHYSFARM_USER, else the OS login)")
    flush_wait_s: float = Field(
        default=15.0, ge=0.0, le=86_400.0,
        description="at the end of a sweep, how long to wait for a tracking store that went down to answer "
                    "again before leaving the kept MLflow writes in the sweep's journal (see docs/sweeps.md)")


class SweepSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, pattern=NAME_PATTERN, description="Tune experiment name")
    num_samples: int = Field(default=1, ge=1, le=100_000,
                             description="samples per grid point (with search: optuna, the number of trials)")
    metric: str = Field(default="val_accuracy", description="metric that ranks trials and that schedulers "
                        "(ASHA, PBT) stop and clone by: a validation or training metric, never a test one")
    mode: Literal["max", "min"] | None = Field(default=None, description="max or min (default: min for a "
                                                "metric named *loss*, else max)")
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    max_trials_per_device: int | dict[str, int] | None = Field(
        default=None, description="most trials running at once on one device: one number for every "
                                  "device, or {device: number} (others unlimited)")
    trial_cpus: float = Field(default=1.0, gt=0.0, le=1024, description="CPUs reserved per trial")
    storage_path: str | None = Field(default=None, description="Tune results folder (default ./ray_results)")
    search: Literal["default", "optuna"] = Field(
        default="default", description="search algorithm: Tune's default (grid and random sampling) or "
                                       "optuna (needs the optuna extra)")
    seed: int | None = Field(default=None, ge=0, description="seeds the search algorithm's sampling")
    scheduler: SchedulerSettings | None = Field(default=None, description="asha or pbt (default: none, FIFO)")
    device_budget_s: float | None = Field(
        default=None, description="device seconds the whole sweep may use, over all devices (twin data "
        "collection, training, validation and test passes); enforced before each device call, shown on "
        "the console and logged on the parent run (default: no budget)")
    max_failures: int = Field(
        default=2, ge=-1, le=1000,
        description="times a trial is retried after its worker fails or dies (a crash, a killed process, "
                    "a lost node), each time from its last checkpoint; 0: never, -1: without limit")

    @field_validator("metric")
    @classmethod
    def _not_a_test_metric(cls, value: str) -> str:
        if value.startswith("test") or "_test" in value:
            raise ValueError(
                f"'{value}' is measured on the test split, which each trial opens once, at its end, on the "
                f"checkpoint it selected by validation; ranking, stopping (ASHA) or cloning (PBT) by it "
                f"would select on the test set. Rank by val_accuracy (or val_loss with mode: min)")
        return value

    @model_validator(mode="after")
    def _mode_of_metric(self) -> "SweepSettings":
        lossy = "loss" in self.metric
        if self.mode is None:
            self.mode = "min" if lossy else "max"
        elif lossy and self.mode == "max":
            raise ValueError(f"sweep.mode: 'max' with metric '{self.metric}' would pick the worst trial; use "
                             f"mode: min (or leave mode out)")
        return self

    @field_validator("device_budget_s")
    @classmethod
    def _positive_budget(cls, value):
        if value is not None and not value > 0:
            raise ValueError(f"a budget of {value!r} device seconds lets no trial measure anything; give a "
                             f"number of seconds > 0, or leave device_budget_s out for no budget")
        return value

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, value):
        return {"kind": value} if isinstance(value, str) else value

    @field_validator("max_trials_per_device", mode="before")
    @classmethod
    def _positive_caps(cls, value):
        # Checked here, not by the int | dict union: pydantic would report each union member's error
        # (an 'int' and a 'dict[str,int]' path) where one line naming the bad entry says it all.
        def cap(v, where: str) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}needs a whole number of trials, at least 1, got {v!r}")
            return v

        if value is None:
            return None
        if isinstance(value, dict):
            return {str(k): cap(v, f"device '{k}' ") for k, v in value.items()}
        if isinstance(value, int) and not isinstance(value, bool):
            return cap(value, "")
        raise ValueError(f"use one number for every device or {{device: number}}, got {value!r}")


class DeviceList(BaseModel):
    """A `devices:` list with unique names (shared by sweep configs and pool files)."""

    model_config = ConfigDict(extra="forbid")

    devices: list[DeviceConfig] = Field(min_length=1)

    @field_validator("devices")
    @classmethod
    def _unique_names(cls, devices: list[DeviceConfig]) -> list[DeviceConfig]:
        names = [d.name for d in devices]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"device names must be unique; repeated: {', '.join(sorted(dup))}")
        return devices


class FarmConfig(DeviceList):
    data: DataConfig = Field(default_factory=DataConfig)
    train: dict[str, Any] = Field(default_factory=dict, description="trainer config; values may be samplers")
    sweep: SweepSettings = Field(default_factory=SweepSettings)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def device(self, name: str) -> DeviceConfig:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def sampled_paths(self) -> dict[str, tuple[str, list]]:
        return samplers(self.train, "train")


def check_systems(cfg: DeviceList) -> None:
    """Validate each device's `system` against its kind's config, in place (defaults filled in)."""
    for i, dev in enumerate(cfg.devices):
        prefix = f"devices[{i}].system"
        try:
            validated = validate_system_config(dev.system)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, prefix)) from None
        except ValueError as err:
            raise ConfigError(f"{prefix}.kind: {err}" if "kind" in str(err) else f"{prefix}: {err}") from None
        dev.system = validated.model_dump(mode="json")
        dev._notes = inspect_files(dev, prefix)


# Fields of a system config that name files: made absolute (a device actor's working folder is not
# the command's), then opened and checked before anything starts.
FILE_FIELDS = ("path", "controls_path", "responses_path")


def inspect_files(dev: "DeviceConfig", prefix: str) -> list[str]:
    """Open every file the device's system names and check it as the device will read it (a recorded
    device: parsed, finite, the declared columns, inside its envelope; nothing fitted). Returns what
    a person should know of the data (printed by --check); a bad file is a ConfigError naming the
    file and its line."""
    files = [f for f in FILE_FIELDS if isinstance(dev.system.get(f), str)]
    if not files or dev.system.get("kind") == "instrument":
        return []
    for f in files:
        dev.system[f] = str(Path(dev.system[f]).expanduser().resolve())
    from actors.systems.registry import build_system

    system = build_system(dev.system)
    inspect = getattr(system, "inspect", None)
    if not callable(inspect):
        return []
    try:
        return list(inspect().get("notes") or [])
    except ValueError as err:
        raise ConfigError(f"{prefix} (device '{dev.name}'): {err}") from None


def _check_train(cfg: FarmConfig) -> None:
    """Validate `train` (and PBT's mutations) for every method and every value a search space can
    produce, before anything starts."""
    names = [d.name for d in cfg.devices]
    mutations = check_sweep(cfg)
    check_train(cfg.train, names)
    if mutations:  # every value PBT may set, in every method's config
        try:
            check_train(cfg.train, names, mutations)
        except ConfigError as err:
            msg = str(err)
            for path in mutations:
                if msg.startswith(path + ":"):
                    key = path.removeprefix("train.")
                    msg = f"sweep.scheduler.hyperparam_mutations.{key}:" + msg[len(path) + 1:]
            raise ConfigError(msg) from None
    if cfg.train.get("device") is None and len(names) == 1:
        cfg.train["device"] = names[0]


def _check_data(cfg: FarmConfig) -> None:
    if cfg.data.path:
        path = Path(cfg.data.path).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"data.path: '{cfg.data.path}' does not exist (resolved to {path})")
        cfg.data.path = str(path)  # absolute, so trials on any worker read the same file


def validated(model, raw: dict):
    """raw validated as the pydantic `model`; a validation error as one ConfigError naming the field."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def parse_config(raw: Any, source: str = "config") -> FarmConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with keys "
                          f"devices, data, train, sweep, tracking; got {type(raw).__name__}")
    cfg = validated(FarmConfig, raw)
    check_systems(cfg)
    _check_data(cfg)
    _check_train(cfg)
    check_fit(cfg)  # the data opened, each trial's network built on spec-only stand-ins
    return cfg


def read_yaml(path: str | Path, missing: str) -> object:
    """Parse a YAML file; a missing file or bad YAML is a one-line ConfigError (with line and column)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(missing.format(path=path))
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None


def load_config(path: str | Path) -> FarmConfig:
    raw = read_yaml(path, "config file '{path}' does not exist")
    return parse_config(raw, str(path))


def methods_available() -> list[str]:
    return sorted(METHODS)
