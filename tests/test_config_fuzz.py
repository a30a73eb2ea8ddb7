"""Property-based fuzz of sweep configs through the real `physfarm sweep` entry point.

Each example starts from a shipped config (examples/*.yaml) and applies one mutation: a wrong type,
an unknown key at any depth, an out-of-range number, a bad enum or system kind, a deleted key, a
broken search-space spec, or malformed YAML text. Whatever the mutation, the CLI either

- refuses it: exit code 2, stderr exactly one line `physfarm: config error: <field path>: ...`,
  nothing on stdout; or
- accepts it (some mutations stay valid): `physfarm sweep --check` says `ok: N trials ...` and
  exits 0, without starting the sweep;

and in both cases no Ray is started and nothing is written (the temporary working directory holds
only the config file afterwards).
"""
from __future__ import annotations

import ast
import contextlib
import copy
import io
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from farm.cli import main
from farm.errors import QUOTED_KEY, field_path

REPO = Path(__file__).resolve().parents[1]
# The sweep configs a user starts from (pool.yaml is a pool file, not a sweep config).
EXAMPLES = {name: yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
            for name in ("quickstart", "mixed", "optuna", "pbt")}
SECTIONS = ("devices", "data", "train", "sweep", "tracking")
# Refusals of the file itself (bad YAML, a top level that is not a mapping) name the file instead.
FILE_LEVEL = re.compile(r"^\S*config\.yaml(: not valid YAML at line \d+, column \d+: | ?: the top level must be)")

# -- paths into a nested config ---------------------------------------------------------------------


def split_refusal(msg: str) -> tuple[str, str, str]:
    """(field path, its first key, the rest) of a refusal 'path: what was wrong'; a quoted key is read
    whole, whatever dots, brackets or ': ' it holds."""
    quoted = re.match(QUOTED_KEY, msg)
    start = quoted.end() if quoted else 0
    cut = msg.find(": ", start)
    if cut < 0:
        return "", "", msg
    reported = msg[:cut]
    root = ast.literal_eval(quoted.group()) if quoted else re.split(r"[.\[]", reported, maxsplit=1)[0]
    return reported, root, msg[cut + 2:]


def walk(node, path=()):
    """Every (path, value) in a nested dict/list config, the root excluded."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield path + (k,), v
        yield from walk(v, path + (k,))


def get(node, path):
    for p in path:
        node = node[p]
    return node


def put(cfg, path, value):
    get(cfg, path[:-1])[path[-1]] = value


def delete(cfg, path):
    parent = get(cfg, path[:-1])
    if isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])


def related(reported: str, mutated: str) -> bool:
    """Does a refusal at `reported` plausibly come from a mutation at `mutated`? Same field, a parent
    or child of it, or one of the config's documented cross-references."""
    def under(a, b):
        return a == b or a.startswith(b + ".") or a.startswith(b + "[")

    if under(reported, mutated) or under(mutated, reported):
        return True
    cross = [  # (mutated under, reported under): fields checked against each other
        ("devices", "train.device"),  # device names are what train.device refers to
        ("devices", "sweep.max_trials_per_device"),
        ("train", "sweep.scheduler"),  # PBT mutations and ASHA's max_t refer to train fields
        ("sweep.scheduler", "train"),  # every value a PBT mutation may set must be a valid train
        ("sweep.search", "train"),  # optuna takes no grid
        ("train.method", "train"),  # which method decides which train fields exist
        ("data", "train"),  # e.g. the data's size bounds batch sizes
    ]
    return any(under(mutated, m) and under(reported, r) for m, r in cross)


# -- mutations ---------------------------------------------------------------------------------------
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.sampled_from(["a", "kind", "grid"]),
                                                             st.integers(-2, 2), max_size=2),
)
OUT_OF_RANGE = st.sampled_from([-1, 0, -10**9, 10**12, 10**30, -0.5, 1e300, math.inf, -math.inf, math.nan])
BROKEN_SPACES = st.sampled_from([
    {"grid": []}, {"grid": 5}, {"choice": {}}, {"choice": None}, {"uniform": [1.0]},
    {"uniform": [2.0, 1.0]}, {"uniform": ["a", 1.0]}, {"loguniform": [0.0, 1.0]},
    {"loguniform": [-1.0, 1.0]}, {"randint": [0.5, 3]}, {"randint": [3, 3]}, {"quniform": [0, 1]},
    {"quniform": [0, 1, 0]}, {"qloguniform": [1, 10, -1]}, {"qrandint": [1, 10, 0.5]},
    {"grid": [[1, 2], {"a": 1}]}, {"choice": ["x", None]}, {"grid": [0.01, "fast"]},
])
NEW_KEYS = st.sampled_from(["zz_unknown", "epoch", "num_sample", "noize", "Kind", "metric_", "lr "])
YAML_BREAKERS = st.sampled_from(["\t", ": [", "]", "{", "- - :", "\"", "'", "&a *b", "!!python/object:os.system ",
                                 "\n  bad", ":\n- ", "%", "@", "`"])


@st.composite
def mutated_config(draw):
    """(example name, mutation kind, mutated path or None, config text)."""
    name = draw(st.sampled_from(sorted(EXAMPLES)))
    cfg = copy.deepcopy(EXAMPLES[name])
    paths = list(walk(cfg))
    kind = draw(st.sampled_from(["wrong_type", "unknown_key", "out_of_range", "bad_enum", "delete",
                                 "bad_space", "bad_kind", "yaml_text", "top_level"]))
    path: tuple | None = None
    if kind == "wrong_type":
        path, _ = draw(st.sampled_from(paths))
        put(cfg, path, draw(ODD_VALUES))
    elif kind == "unknown_key":
        dicts = [()] + [p for p, v in paths if isinstance(v, dict)]
        parent = draw(st.sampled_from(dicts))
        key = draw(NEW_KEYS)
        get(cfg, parent)[key] = draw(ODD_VALUES)
        path = parent + (key,)
    elif kind == "out_of_range":
        numbers = [p for p, v in paths if isinstance(v, (int, float)) and not isinstance(v, bool)]
        path = draw(st.sampled_from(numbers))
        put(cfg, path, draw(OUT_OF_RANGE))
    elif kind == "bad_enum":
        strings = [p for p, v in paths if isinstance(v, str)]
        path = draw(st.sampled_from(strings))
        put(cfg, path, draw(st.sampled_from(["", "lazer", "MAX", "asha ", "optunaa", "pat,phyll", "None", "é"])))
    elif kind == "delete":
        path, _ = draw(st.sampled_from(paths))
        delete(cfg, path)
    elif kind == "bad_space":
        train = [p for p, v in paths if p[0] == "train"] or [("train", "lr")]
        path = draw(st.sampled_from(train))
        put(cfg, path, draw(BROKEN_SPACES))
    elif kind == "bad_kind":
        i = draw(st.integers(0, len(cfg["devices"]) - 1))
        path = ("devices", i, "system", "kind")
        put(cfg, path, draw(st.sampled_from(["lazer", "", "Oscillators", "mylab.nope:Thing", "os:system",
                                             "actors.systems.oscillators:Nope", 3, None])))
    elif kind == "top_level":
        cfg = draw(st.sampled_from([[], "devices", 3, None, [{"devices": []}]]))
    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    if kind == "yaml_text":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(YAML_BREAKERS) + text[at:]
    return name, kind, None if path is None else field_path(path), text


def _safe_yaml(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


# -- running the real CLI in a fresh, empty working directory ---------------------------------------
def run_cli(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        os.chdir(here)
    return rc, out.getvalue(), err.getvalue()


def check_refusal(stderr: str, stdout: str, kind: str, path: str | None, top_keys=()) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"not exactly one line on stderr: {stderr!r}"
    assert stdout == "", stdout
    prefix = "physfarm: config error: "
    assert lines[0].startswith(prefix), lines[0]
    msg = lines[0][len(prefix):]
    if FILE_LEVEL.match(msg):
        assert kind in ("yaml_text", "top_level", "wrong_type", "delete"), f"{kind} at {path}: {msg!r}"
        return
    reported, root, _ = split_refusal(msg)
    assert reported and (root in SECTIONS or root in top_keys), \
        f"{kind} at {path}: the message names no field path: {msg!r}"
    if path is not None and kind != "delete":
        assert related(reported, path), f"{kind} at {path} reported at {reported!r}: {msg!r}"


@pytest.fixture(autouse=True)
def no_mlflow_env(monkeypatch):
    # The CLI reads MLFLOW_TRACKING_URI; the fuzz must not depend on the caller's environment.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def added_key(name: str, parent: tuple, key: str, value) -> tuple:
    """A case as mutated_config writes it: `key: value` added under `parent` of example `name`."""
    cfg = copy.deepcopy(EXAMPLES[name])
    get(cfg, parent)[key] = value
    return name, "unknown_key", field_path(parent + (key,)), yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_config())
# Found in CI: a sweep over methods reports an unknown key by its own route, which did not quote it.
@example(added_key("mixed", ("train",), "lr ", None))
@example(added_key("mixed", ("train",), "lr ", {"grid": 2}))
def test_mutated_configs_are_refused_in_one_line_or_accepted_by_check(case):
    name, kind, path, text = case
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "config.yaml").write_text(text)
        rc, out, err = run_cli(["sweep", "config.yaml", "--check"], cwd)
        assert rc in (0, 2), (rc, out, err)
        if rc == 2:
            raw = _safe_yaml(text)
            check_refusal(err, out, kind, path, list(raw) if isinstance(raw, dict) else [])
            # The plain sweep command refuses it the same way, before anything starts.
            rc2, out2, err2 = run_cli(["sweep", "config.yaml"], cwd)
            assert (rc2, out2, err2) == (rc, out, err)
        else:
            assert err == "" and re.match(r"ok: \d+ trials? in sweep '", out), (out, err)
        assert not ray.is_initialized(), "a config check started Ray"
        assert sorted(p.name for p in cwd.iterdir()) == ["config.yaml"], "a config check wrote files"


def test_every_example_passes_check_and_counts_its_trials(tmp_path):
    expected = {"quickstart": 4, "mixed": 6, "optuna": 12, "pbt": 4}
    for name, n in expected.items():
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(EXAMPLES[name]))
        rc, out, err = run_cli(["sweep", "config.yaml", "--check"], tmp_path)
        assert (rc, err) == (0, ""), err
        assert out.startswith(f"ok: {n} trials in sweep '{name}'"), out
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    assert not ray.is_initialized()


def test_subprocess_check_of_a_valid_config_starts_nothing(tmp_path):
    """A real `physfarm` process (refusals by subprocess are in test_config.py)."""
    (tmp_path / "config.yaml").write_text((REPO / "examples" / "quickstart.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "farm.cli", "sweep", "config.yaml", "--check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: 4 trials in sweep 'quickstart' on device osc; sampled: train.lr, train.seed")
    assert proc.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_fuzz_finding_method_grid_of_mappings_is_one_line(tmp_path):
    """Found by the fuzz: a mapping inside train.method's grid crashed with TypeError (unhashable)."""
    cfg = copy.deepcopy(EXAMPLES["mixed"])
    cfg["train"]["method"] = {"grid": [{"grid": []}, "phyll"]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc, out, err = run_cli(["sweep", "config.yaml"], tmp_path)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("physfarm: config error: train.method: 'grid' needs a non-empty list of method names"), err
