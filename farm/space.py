"""The YAML search-space syntax, turned into Ray Tune samplers.

Any value in the `train` section may be a one-key mapping naming a sampler:
  {grid: [a, b, ...]}            every value, crossed with other grids (tune.grid_search)
  {choice: [a, b, ...]}          one drawn per sample (tune.choice)
  {uniform: [low, high]}         float, uniform
  {loguniform: [low, high]}      float, log-uniform (0 < low)
  {randint: [low, high]}         int in [low, high) (tune.randint)
  {quniform: [low, high, q]}     uniform rounded to a multiple of q
  {qloguniform: [low, high, q]}  log-uniform rounded to a multiple of q
  {qrandint: [low, high, q]}     int rounded to a multiple of q (high inclusive)
Nested mappings are walked, so nested keys may be sampled too.
"""
from __future__ import annotations

from typing import Any

from .errors import ConfigError, join_path

FORMS = {
    "grid": "a non-empty list of values",
    "choice": "a non-empty list of values",
    "uniform": "[low, high] numbers with low < high",
    "loguniform": "[low, high] numbers with 0 < low < high",
    "randint": "[low, high] integers with low < high",
    "quniform": "[low, high, q] numbers with low < high and q > 0",
    "qloguniform": "[low, high, q] numbers with 0 < low < high and q > 0",
    "qrandint": "[low, high, q] integers with low < high and q > 0",
}


def is_sampler(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in FORMS


def check_sampler(path: str, form: str, args: Any) -> None:
    bad = ConfigError(f"{path}: '{form}' needs {FORMS[form]}, got {args!r}")
    if form in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise bad
        return
    n = 3 if form.startswith("q") else 2
    if not isinstance(args, list) or len(args) != n:
        raise bad
    ints = form in ("randint", "qrandint")
    for a in args:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or (ints and not isinstance(a, int)):
            raise bad
    if not args[0] < args[1] or ("log" in form and args[0] <= 0) or (n == 3 and args[2] <= 0):
        raise bad


def to_tune(form: str, args: list):
    """The Tune search space of a sampler (Ray Tune imported here: checking a config needs none)."""
    from ray import tune

    if form == "grid":
        return tune.grid_search(args)
    if form == "choice":
        return tune.choice(args)
    return getattr(tune, form)(*args)


def samplers(section: dict, prefix: str) -> dict[str, tuple[str, list]]:
    """Every sampler in `section` by dotted path, each checked; raises ConfigError naming the key."""
    found: dict[str, tuple[str, list]] = {}
    for key, value in section.items():
        path = join_path(prefix, key)
        if is_sampler(value):
            form, args = next(iter(value.items()))
            check_sampler(path, form, args)
            found[path] = (form, args)
        elif isinstance(value, dict):
            found.update(samplers(value, path))
    return found


def representatives(form: str, args: list) -> list:
    """Values that stand for a sampler when checking a config before anything starts."""
    if form in ("grid", "choice"):
        return list(args)
    return [args[0], args[1]] if form != "randint" else [args[0], args[1] - 1]


def substitute(section: dict, path_values: dict[str, Any], prefix: str) -> dict:
    """A copy of `section` with the samplers at the given dotted paths replaced by values."""
    out = {}
    for key, value in section.items():
        path = join_path(prefix, key)
        if path in path_values:
            out[key] = path_values[path]
        elif isinstance(value, dict) and not is_sampler(value):
            out[key] = substitute(value, path_values, path)
        else:
            out[key] = value
    return out


def to_param_space(section: dict) -> dict:
    """The section with every sampler replaced by its Tune search-space object."""
    out = {}
    for key, value in section.items():
        if is_sampler(value):
            form, args = next(iter(value.items()))
            out[key] = to_tune(form, args)
        elif isinstance(value, dict):
            out[key] = to_param_space(value)
        else:
            out[key] = value
    return out
