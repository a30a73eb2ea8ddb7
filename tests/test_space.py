"""The search-space syntax, method sections, search/scheduler settings: all checked before Ray starts
(no Ray, no MLflow in this module)."""
from __future__ import annotations

import copy
import io

import pytest
from ray import tune
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized
from ray.tune.search.variant_generator import generate_variants

from farm import sweep_settings, tuning
from farm.config import parse_config
from farm.errors import ConfigError
from farm.space import FORMS, samplers, to_param_space
from farm.sweep import config_digest, expected_trials
from farm.train_cli import ProgressBar, pick_first
from farm.trainspec import resolve_train, resolved_config
from trainers.registry import METHODS

DEVICES = [{"name": "osc", "system": {"kind": "oscillators", "n": 16}},
           {"name": "osc2", "system": {"kind": "oscillators", "n": 16, "seed": 1}}]


def cfg(train: dict, sweep: dict | None = None, devices=None):
    return {"devices": copy.deepcopy(devices or DEVICES), "data": {"kind": "digits"},
            "train": {"device": "osc", "encoder": {"kind": "downsample", "size": [4, 4]}, **train}, "sweep": sweep or {}}


def error(raw) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- samplers -> Tune
def test_every_form_becomes_the_matching_tune_sampler():
    train = {"a": {"grid": [1, 2]}, "b": {"choice": ["x", "y"]}, "c": {"uniform": [0.1, 0.2]},
             "d": {"loguniform": [1e-4, 1e-1]}, "e": {"randint": [1, 5]}, "f": {"quniform": [0, 1, 0.25]},
             "g": {"qloguniform": [1e-3, 1, 1e-3]}, "h": {"qrandint": [0, 10, 2]},
             "nested": {"deeper": {"i": {"choice": [3, 4]}}, "plain": 7}}
    space = to_param_space(train)
    assert space["a"] == {"grid_search": [1, 2]}
    assert isinstance(space["b"], Categorical) and space["b"].categories == ["x", "y"]
    assert isinstance(space["c"], Float) and (space["c"].lower, space["c"].upper) == (0.1, 0.2)
    assert isinstance(space["d"].get_sampler(), LogUniform)
    assert isinstance(space["e"], Integer) and (space["e"].lower, space["e"].upper) == (1, 5)
    for key, q in (("f", 0.25), ("g", 1e-3), ("h", 2)):
        assert isinstance(space[key].get_sampler(), Quantized) and space[key].get_sampler().q == q
    assert isinstance(space["nested"]["deeper"]["i"], Categorical) and space["nested"]["plain"] == 7
    assert set(samplers(train, "train")) == {f"train.{k}" for k in "abcdefgh"} | {"train.nested.deeper.i"}
    # Sampled values respect the ranges (Tune draws them).
    for _, spec in generate_variants({"train": space}):
        t = spec["train"]
        assert 1 <= t["e"] < 5 and t["f"] in (0, 0.25, 0.5, 0.75, 1.0) and t["h"] % 2 == 0
        assert 1e-4 <= t["d"] <= 1e-1 and t["nested"]["deeper"]["i"] in (3, 4)


@pytest.mark.parametrize("value, words", [
    ({"grid": []}, "'grid' needs a non-empty list"),
    ({"choice": "abc"}, "'choice' needs a non-empty list"),
    ({"uniform": [1]}, "'uniform' needs [low, high]"),
    ({"uniform": [0.2, 0.1]}, "low < high"),
    ({"loguniform": [0, 1]}, "0 < low < high"),
    ({"randint": [1.5, 3]}, "integers"),
    ({"quniform": [0, 1]}, "[low, high, q]"),
    ({"qrandint": [0, 10, 0]}, "q > 0"),
    ({"gird": [0.1, 0.2]}, "'gird' is not a search space; allowed forms: {grid:"),
])
def test_a_bad_search_space_names_the_key_and_the_allowed_forms(value, words):
    msg = error(cfg({"lr": value}))
    assert msg.startswith("train.lr:") and words in msg, msg


def test_nested_keys_are_checked_and_named():
    msg = error(cfg({"twin": {"kind": "calibrated", "steps": {"uniform": [5]}}}))
    assert msg.startswith("train.twin.steps:") and "[low, high]" in msg, msg
    msg = error(cfg({"twin": {"kind": "calibrated", "steps": {"grid": [10, -1]}}}))
    assert msg.startswith("train.twin.steps:"), msg


# ---------------------------------------------------------------- methods
needs_phyll = pytest.mark.skipif("phyll" not in METHODS, reason="method phyll not registered")


@needs_phyll
def test_method_sections_merge_into_their_methods_trials_only():
    c = parse_config(cfg({"method": {"grid": ["pat", "phyll"]}, "device": {"grid": ["osc", "osc2"]},
                          "epochs": 1, "pat": {"n_layers": 2}, "phyll": {"n_blocks": {"grid": [1, 2]}}}))
    space = tuning.build_param_space(c)
    trials = [spec["train"] for _, spec in generate_variants(space)]
    pat = [t for t in trials if t["method"] == "pat"]
    phyll = [t for t in trials if t["method"] == "phyll"]
    # 2 devices for pat; 2 devices x 2 n_blocks for phyll: no pat trial repeated for phyll's grid.
    assert len(pat) == 2 and len(phyll) == 4 and expected_trials(c) == 6
    assert all(t["n_layers"] == 2 and "n_blocks" not in t for t in pat)
    assert sorted(t["n_blocks"] for t in phyll) == [1, 1, 2, 2] and all("n_layers" not in t for t in phyll)
    assert resolved_config(phyll[0], ["osc", "osc2"])["skip"] is False  # defaults filled in
    # With a choice over methods (or Optuna) the sections travel along and the trial merges its own.
    raw = {"method": "phyll", "epochs": 1, "pat": {"n_layers": 2}, "phyll": {"n_blocks": 3}}
    assert resolve_train(raw, ["osc"]) == {"method": "phyll", "epochs": 1, "n_blocks": 3, "device": "osc"}


@needs_phyll
@pytest.mark.parametrize("train, path, words", [
    ({"method": {"grid": ["pat", "phyll"]}, "n_layers": 2}, "train.n_layers", "not a field of method 'phyll'"),
    ({"method": {"grid": ["pat", "phyll"]}, "phyll": {"n_layers": 2}}, "train.phyll.n_layers", "unknown field"),
    ({"method": {"grid": ["pat", "phyll"]}, "phyll": {"n_blocks": {"grid": [1, 99]}}}, "train.phyll.n_blocks",
     "less than or equal to 16"),
    ({"method": "pat", "phyll": {"n_blocks": 2}}, "train.phyll", "never runs"),
    ({"method": {"grid": ["pat", "magic"]}}, "train.method", "unknown training method 'magic'"),
    ({"method": {"uniform": [0, 1]}}, "train.method", "grid or choice"),
])
def test_every_methods_config_is_validated_before_anything_starts(train, path, words):
    msg = error(cfg(train))
    assert msg.startswith(path + ":") and words in msg, msg


# ---------------------------------------------------------------- search and schedulers
def test_optuna_refuses_grids_and_names_the_extra_when_missing(monkeypatch):
    msg = error(cfg({"lr": {"grid": [0.01, 0.1]}}, {"search": "optuna"}))
    if "not installed" not in msg:
        assert msg.startswith("train.lr:") and "use 'choice'" in msg
    monkeypatch.setattr(sweep_settings.importlib.util, "find_spec", lambda name, *a: None)
    msg = error(cfg({"lr": {"choice": [0.01, 0.1]}}, {"search": "optuna"}))
    assert msg.startswith("sweep.search:") and "physfarm[optuna]" in msg


@pytest.mark.parametrize("sweep, path, words", [
    ({"scheduler": "pbt"}, "sweep.scheduler.perturbation_interval", "required for kind 'pbt'"),
    ({"scheduler": {"kind": "pbt", "perturbation_interval": 1}}, "sweep.scheduler.hyperparam_mutations", "required"),
    ({"scheduler": {"kind": "pbt", "perturbation_interval": 1, "hyperparam_mutations": {"lr": {"grid": [1]}}}},
     "sweep.scheduler.hyperparam_mutations.lr", "'grid' cannot be mutated"),
    ({"scheduler": {"kind": "pbt", "perturbation_interval": 1, "hyperparam_mutations": {"lr": [0.01, 50]}}},
     "sweep.scheduler.hyperparam_mutations.lr", "less than or equal to 10"),
    ({"scheduler": {"kind": "pbt", "perturbation_interval": 1, "hyperparam_mutations": {"lrr": [0.1]}}},
     "sweep.scheduler.hyperparam_mutations.lrr", "unknown field"),
    ({"scheduler": {"kind": "asha", "time_attr": "device_s"}}, "sweep.scheduler.max_t", "required when time_attr"),
    ({"scheduler": {"kind": "asha", "time_attr": "wallclock"}}, "sweep.scheduler.time_attr", "device_s"),
    ({"scheduler": {"kind": "asha", "perturbation_interval": 2}}, "sweep.scheduler.perturbation_interval",
     "not a setting of kind 'asha'"),
    ({"scheduler": {"kind": "hyperband"}}, "sweep.scheduler.kind", "'pbt' or 'multifidelity'"),
    ({"max_trials_per_device": {"osc3": 1}}, "sweep.max_trials_per_device.osc3", "not a configured device"),
    ({"max_trials_per_device": 0}, "sweep.max_trials_per_device", "at least 1"),
    # found by the config fuzz: a null cap gave pydantic's two union-member errors in one line
    ({"max_trials_per_device": {"osc": 1, "osc2": None}}, "sweep.max_trials_per_device",
     "device 'osc2' needs a whole number of trials, at least 1, got None"),
    ({"max_trials_per_device": "two"}, "sweep.max_trials_per_device", "one number for every device or"),
])
def test_bad_sweep_settings_name_the_field(sweep, path, words):
    msg = error(cfg({}, sweep))
    assert msg.startswith(path + ":") and words in msg, msg


def test_schedulers_and_search_are_built_from_the_config():
    from ray.tune.schedulers import AsyncHyperBandScheduler, PopulationBasedTraining

    c = parse_config(cfg({"epochs": 3, "lr": {"grid": [0.01, 0.02]}},
                         {"scheduler": {"kind": "asha", "time_attr": "device_s", "max_t": 30},
                          "max_trials_per_device": {"osc": 1}}))
    sched = tuning.build_scheduler(c)
    assert isinstance(sched, tuning.DeviceLimitScheduler) and sched.limits == {"osc": 1}
    assert isinstance(sched.inner, AsyncHyperBandScheduler) and sched.inner._time_attr == "device_s_total"
    c = parse_config(cfg({"epochs": 3}, {"scheduler": {"kind": "pbt", "perturbation_interval": 1,
                                                        "hyperparam_mutations": {"lr": {"loguniform": [1e-3, 0.1]}}}}))
    pbt = tuning.build_scheduler(c)
    assert isinstance(pbt, PopulationBasedTraining) and isinstance(pbt._hyperparam_mutations["train"]["lr"], Float)
    c = parse_config(cfg({"epochs": 4}, {"scheduler": "asha", "max_trials_per_device": 2}))
    sched = tuning.build_scheduler(c)
    assert sched.inner._max_t == 4 and sched.limits == {"osc": 2, "osc2": 2}  # max_t: the epochs
    assert tuning.build_search(parse_config(cfg({}, {"seed": 3}))) is not None


def test_resume_digest_follows_the_search_space_only():
    a = parse_config(cfg({"lr": {"grid": [0.01, 0.1]}}, {"storage_path": "/tmp/a"}))
    b = parse_config(cfg({"lr": {"grid": [0.01, 0.1]}}, {"storage_path": "/tmp/b"}))
    c = parse_config(cfg({"lr": {"grid": [0.01, 0.2]}}))
    assert config_digest(a) == config_digest(b) != config_digest(c)


# ---------------------------------------------------------------- physfarm train
def test_train_takes_first_values_and_refuses_ranges():
    train, notes = pick_first({"lr": {"grid": [0.01, 0.1]}, "seed": {"choice": [3]}, "twin": {"steps": {"grid": [5, 6]}}})
    assert train == {"lr": 0.01, "seed": 3, "twin": {"steps": 5}}
    assert [n.split(":")[0] for n in notes] == ["train.lr", "train.twin.steps"]
    with pytest.raises(ConfigError, match=r"train.lr: 'loguniform' is a search space"):
        pick_first({"lr": {"loguniform": [0.001, 0.1]}})


def test_progress_bar_is_plain_text():
    out = io.StringIO()
    bar = ProgressBar(4, out, width=8)
    bar.update(1, {"loss": 1.5, "val_accuracy": 0.25, "device_s_total": 0.5})
    bar.update(4, {"loss": 0.5, "val_accuracy": 0.75})
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[##......] epoch 1/4") and "loss 1.500" in lines[0] and "val 0.250" in lines[0]
    assert lines[1].startswith("[########] epoch 4/4") and len(lines) == 2


def test_forms_documented():
    assert set(FORMS) == {"grid", "choice", "uniform", "loguniform", "randint", "quniform", "qloguniform",
                          "qrandint"}
    assert isinstance(tune.qrandint(0, 10, 2).get_sampler(), Quantized)


@pytest.mark.parametrize("name", ["quickstart", "mixed", "optuna", "pbt"])
def test_examples_parse(name):
    from pathlib import Path

    from farm.config import load_config

    if name == "optuna":
        pytest.importorskip("optuna")
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / f"{name}.yaml")
    assert tuning.build_param_space(cfg)["train"]


def test_device_accounting_is_cumulative_across_restores_and_actor_restarts():
    from farm.trainable import EpochReporter

    class Device:  # what DeviceClient.client_stats() returns, call after call
        def __init__(self):
            self.seen = [{"device_s": 1.0, "wait_s": 0.5, "requests": 3},   # at the (re)start of the trial
                         {"device_s": 2.0, "wait_s": 0.5, "requests": 5},   # epoch 1
                         {"device_s": 0.5, "wait_s": 0.1, "requests": 1}]   # epoch 2: the actor restarted

        def client_stats(self):
            return self.seen.pop(0)

    config = type("Config", (), {"epochs": 9})()
    reported = []
    reporter = EpochReporter(Device(), "pat", config, None, lambda m, folder: reported.append(m),
                             accounting={"device_s_total": 10.0, "queue_wait_s_total": 1.0,
                                         "device_requests_total": 7})
    reporter({"epoch": 1}, None)
    reporter({"epoch": 2}, None)
    assert [m["device_s_total"] for m in reported] == [11.0, 11.5]  # the checkpoint's count goes on
    assert [m["device_requests_total"] for m in reported] == [9.0, 10.0]
    assert reported[1]["queue_wait_s_total"] == pytest.approx(1.1)
