"""The `train` section: shared fields, per-method sections, and its validation for every method.

A sweep may mix training methods. Fields every method of the sweep has go at the top of `train`;
fields only one method has go in a section named after the method, merged into a trial's config
when (and only when) that trial runs that method:

    train:
      method: {grid: [pat, phyll]}
      epochs: 2
      lr: {loguniform: [0.001, 0.1]}
      pat:   {n_layers: 2}
      phyll: {n_blocks: {grid: [1, 2]}}

A section's values may be search spaces too. Sections of methods the sweep never runs are refused
(a likely typo), and every method's config is validated before anything starts.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from trainers.registry import METHODS, method

from .errors import ConfigError, field_path, format_validation_error, join_path, split_path
from .space import FORMS, is_sampler, representatives, samplers, substitute

if TYPE_CHECKING:
    from .config import FarmConfig

DEFAULT_METHOD = "pat"


def is_section(key: str, value: Any) -> bool:
    return key in METHODS and isinstance(value, dict) and not is_sampler(value)


def split(train: dict) -> tuple[dict, dict[str, dict]]:
    """(shared fields, {method: its section})."""
    base = {k: v for k, v in train.items() if not is_section(k, v)}
    sections = {k: v for k, v in train.items() if is_section(k, v)}
    return base, sections


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(out.get(k), dict) and isinstance(v, dict) and not is_sampler(v) and not is_sampler(out[k]):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def for_method(train: dict, name: str) -> dict:
    """The shared fields with `name`'s section merged in, `method` set, other sections dropped.
    Values may still be search spaces (used to build one Tune grid branch per method)."""
    base, sections = split(train)
    out = _merge(base, sections.get(name, {}))
    out["method"] = name
    return out


def resolve_train(train: dict, devices: list[str]) -> dict:
    """A trial's concrete train config: its method's section merged in, the only device filled in."""
    base, _ = split(train)
    name = base.get("method", DEFAULT_METHOD)
    out = for_method(train, name) if isinstance(name, str) else dict(base)
    if out.get("device") is None and len(devices) == 1:
        out["device"] = devices[0]
    return out


def trial_device(train: dict, devices: list[str]) -> str | None:
    return resolve_train(train, devices).get("device")


def methods_of(train: dict) -> list[str]:
    """The methods a sweep's train section can run (the values of `method`, or its one value)."""
    value = train.get("method", DEFAULT_METHOD)
    if is_sampler(value):
        form, args = next(iter(value.items()))
        if form in ("grid", "choice"):
            bad = [a for a in args if not isinstance(a, str)] if isinstance(args, list) and args else [args]
            if bad:  # e.g. a nested mapping, which would not even hash
                raise ConfigError(f"train.method: '{form}' needs a non-empty list of method names "
                                  f"({', '.join(sorted(METHODS))}), got {bad[0]!r}")
            return [str(v) for v in dict.fromkeys(args)]
        raise ConfigError(f"train.method: use grid or choice over method names, not '{form}'; "
                          f"methods: {', '.join(sorted(METHODS))}")
    return [str(value)]


def _not_a_sampler_hint(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        key, args = next(iter(value.items()))
        if isinstance(args, list) and key not in FORMS:
            allowed = "; ".join(f"{{{f}: {desc}}}" for f, desc in FORMS.items())
            return f"'{key}' is not a search space; allowed forms: {allowed}"
    return None


def _format(err: ValidationError, prefix: str, concrete: dict, name: str, mixed: bool) -> str:
    msgs = []
    for e in err.errors(include_url=False):
        loc = [str(p) for p in e["loc"]]
        path = field_path(tuple(e["loc"]), prefix)
        hint = _not_a_sampler_hint(e.get("input"))
        if hint:
            msgs.append(f"{path}: {hint}")
        elif e["type"] == "extra_forbidden" and mixed and len(loc) == 1 and prefix == "train":
            msgs.append(f"{path}: not a field of method '{name}'; put fields only some methods have "
                        f"in that method's section (e.g. {join_path('train.<method>', loc[0])})")
    if msgs:
        return "; ".join(msgs)
    text = format_validation_error(err, prefix)
    return f"{text} (method '{name}')" if mixed and prefix == "train" else text


def validate_train(concrete: dict, devices: list[str], mixed: bool = False) -> BaseModel:
    """The validated trainer config of one concrete train section; ConfigError naming the field."""
    base, sections = split(concrete)
    name = base.get("method", DEFAULT_METHOD)
    try:
        m = method(str(name))
    except ValueError as err:
        raise ConfigError(f"train.method: {err}") from None
    section = sections.get(name)
    if section:
        try:  # the section alone first, so that its errors carry its path
            m.config_class.model_validate({**section, "method": name})
        except ValidationError as err:
            real = [e for e in err.errors() if e["type"] != "missing"]
            if real:
                raise ConfigError(_format(err, f"train.{name}", concrete, name, mixed)) from None
    merged = resolve_train(concrete, devices)
    try:
        tc = m.config_class.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format(err, "train", concrete, name, mixed)) from None
    device = getattr(tc, "device", None)
    if device is None:
        raise ConfigError(f"train.device: required when several devices are defined; one of {devices}")
    if device not in devices:
        raise ConfigError(f"train.device: '{device}' is not a configured device; one of {devices}")
    for i, layer in enumerate(getattr(tc, "layers", None) or []):
        if layer.device is not None and layer.device not in devices:
            raise ConfigError(f"train.layers[{i}].device: '{layer.device}' is not a configured device; "
                              f"one of {devices}")
    return tc


def resolved_config(train: dict, devices: list[str]) -> dict:
    """The full config a trial trains with (defaults included), as plain JSON-able values."""
    concrete = resolve_train(train, devices)
    m = method(str(concrete.get("method", DEFAULT_METHOD)))
    return m.config_class.model_validate(concrete).model_dump(mode="json")


def cases(train: dict, extra: dict[str, tuple[str, list]] | None = None, limit: int = 256) -> list[dict]:
    """Concrete train sections that stand for every value each search space can produce."""
    space = samplers(train, "train")
    space.update(extra or {})
    paths = list(space)
    options = [representatives(*space[p]) for p in paths]
    # Each sampler's values one at a time, the others at their first value: catches every bad value
    # without crossing all grids; methods differ in fields, so the methods cross with the others.
    first = {p: o[0] for p, o in zip(paths, options)}
    combos = [first]
    for i, p in enumerate(paths):
        for value in options[i][1:]:
            combos.append({**first, p: value})
    if "train.method" in space:
        combos += [dict(zip(paths, c)) for c in itertools.islice(itertools.product(*options), limit)]
    out = []
    for combo in combos:
        own = {p: v for p, v in combo.items() if p not in (extra or {})}
        concrete = substitute(train, own, "train")
        for p, v in combo.items():
            if p in (extra or {}):
                _set_path(concrete, split_path(p)[1:], v)
        out.append(concrete)
    return out


def _set_path(node: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def check_train(train: dict, devices: list[str], extra: dict[str, tuple[str, list]] | None = None) -> None:
    """Validate `train` for every method and every value its search spaces can produce."""
    samplers(train, "train")  # each search space well-formed (names the key and the allowed forms)
    names = methods_of(train)
    for name in names:
        if name not in METHODS:
            raise ConfigError(f"train.method: unknown training method '{name}'; choose one of "
                              f"{', '.join(sorted(METHODS))}")
    _, sections = split(train)
    for sec in sections:
        if sec not in names:
            raise ConfigError(f"train.{sec}: a section for method '{sec}', which this sweep never runs "
                              f"(train.method is {' or '.join(names)})")
    mixed = len(names) > 1
    for concrete in cases(train, extra):
        validate_train(concrete, devices, mixed)


def expected_trials(cfg: "FarmConfig") -> int:
    """How many trials the sweep runs in all (grid points times samples; Optuna: num_samples)."""
    import math

    from .space import is_sampler, samplers

    n = cfg.sweep.num_samples
    if cfg.sweep.search != "default":
        return n

    def grid_points(section: dict) -> int:
        return math.prod(len(args) for form, args in samplers(section, "train").values() if form == "grid")

    value = cfg.train.get("method")
    if is_sampler(value) and "grid" in value:
        return n * sum(grid_points(for_method(cfg.train, m)) for m in methods_of(cfg.train))
    return n * grid_points(cfg.train)
