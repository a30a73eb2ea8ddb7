"""Config errors as one line each: the field path, what was wrong, what was given."""
from __future__ import annotations

import ast
import re

from pydantic import ValidationError

# A field name as a config writes it; any other key (spaces, dots, YAML tags pasted into it) is shown
# quoted, so that its dots or brackets are not read as steps of the path.
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class ConfigError(ValueError):
    """A config was refused; the message is one line naming the field path and the allowed values."""


def quote_key(key) -> str:
    """A key as one step of a field path: `lr` as is, `lr ` or `a.b` quoted (`'lr '`, `'a.b'`)."""
    return str(key) if _PLAIN_KEY.fullmatch(str(key)) else repr(str(key))


def join_path(prefix: str, key) -> str:
    """The field path one key below `prefix` ("train", "lr" -> "train.lr"); odd keys quoted."""
    return f"{prefix}.{quote_key(key)}" if prefix else quote_key(key)


# A key as quote_key writes a non-plain one (repr: in single quotes, or double where it holds a ').
QUOTED_KEY = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
# One step of a dotted path: a quoted key or a plain run of non-dots.
_STEP = re.compile(f"{QUOTED_KEY}|[^.]+")


def split_path(path: str) -> list[str]:
    """The keys of a dotted path built by join_path: "train.'a.b'.x" -> ["train", "a.b", "x"]."""
    keys = []
    for step in _STEP.findall(path):
        keys.append(ast.literal_eval(step) if step[0] in "'\"" else step)
    return keys


def field_path(loc: tuple, prefix: str = "") -> str:
    """("train", "lr") -> "train.lr"; ("devices", 0, "name") -> "devices[0].name"; odd keys quoted;
    below `prefix` when one is given (pydantic's own function/union steps are left out)."""
    path = prefix
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif not str(item).startswith(("function-", "tagged-union")):
            path = join_path(path, item)
    return path


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    msgs = []
    for e in err.errors(include_url=False):
        path = field_path(tuple(e["loc"]), prefix)
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the config reference in README.md)"
        elif e["type"] not in ("value_error", "missing") and "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        msgs.append(f"{path}: {msg}" if path else msg)
    return "; ".join(msgs)
