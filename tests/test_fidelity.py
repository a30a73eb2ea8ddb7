"""The multifidelity strategy and the device budget: promotion by device validation, warm start from
in-silico weights, the budget's bound, and resume. Real Ray, Tune and MLflow (SQLite); the devices
are the simulators."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from actors.systems.oscillators import Oscillators
from farm.config import parse_config
from farm.data import DataConfig, load_dataset
from farm.errors import ConfigError
from farm.fidelity import promote
from farm.sweep import read_marker, run_sweep
from farm.tracking import PARENT_TAG
from trainers.config import InSilicoConfig, PATConfig, PhyLLConfig
from trainers.pat import train_insilico, train_pat
from trainers.phyll import train_phyll

from conftest import store_count, sweep_signalled_when

DOWN = {"kind": "downsample", "size": [4, 4]}
OSC = {"name": "osc", "system": {"kind": "oscillators", "n": 16, "seed": 0}}


def _raw(tmp_path, name: str, train: dict | None = None, sweep: dict | None = None, devices=(OSC,)) -> dict:
    return {
        "devices": [dict(d) for d in devices],
        "data": {"kind": "digits", "limit": 200},
        "train": {"method": "pat", "epochs": 2, "batch_size": 32, "encoder": DOWN, **(train or {})},
        "sweep": {"name": name, "trial_cpus": 1, "storage_path": str(tmp_path / "ray_results"), **(sweep or {})},
        "tracking": {"experiment": name},
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(kind="digits", limit=300))


def _children(store: str, outcome) -> list:
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(outcome.experiment)
    return [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get(PARENT_TAG) == outcome.parent_run_id]


# ---- promotion -----------------------------------------------------------------------------------------
def test_promote_ranks_by_selected_validation_and_skips_unmeasured():
    rows = [("a", {"best_val_accuracy": 0.40, "val_accuracy": 0.90}),  # selected epoch counts, not the last
            ("b", {"best_val_accuracy": 0.70}), ("c", {"best_val_accuracy": float("nan")}),
            ("d", {"val_accuracy": 0.55}), ("e", {"best_val_accuracy": 0.70})]
    assert promote(rows, 3) == ["b", "e", "d"]  # a tie goes to the lower id
    assert promote([("x", {"val_loss": 0.3}), ("y", {"val_loss": 0.1})], 1, "val_loss", "min") == ["y"]


def test_multifidelity_sweep_promotes_the_best_screened_and_tags_every_run(ray_session, tmp_path, store):
    """4 configurations screened in silico, the 2 best by device validation promoted to PAT from their
    in-silico weights; every child run says its fidelities, device seconds at each and its source."""
    train = {"lr": {"grid": [0.003, 0.1]}, "theta_init_scale": {"grid": [0.05, 0.5]}}
    sweep = {"scheduler": {"kind": "multifidelity", "promote": 2, "keep": 1, "screen_epochs": 2},
             "device_budget_s": 1000}
    outcome = run_sweep(parse_config(_raw(tmp_path, "mf", train, sweep)), tracking_uri=store)

    runs = _children(store, outcome)
    screened = [r for r in runs if r.data.tags.get("physfarm.fidelities") == "0"]
    promoted = [r for r in runs if r.data.tags.get("physfarm.fidelities", "").startswith("0,1")]
    assert len(screened) == 4 and len(promoted) == 2 and len(runs) == 6
    assert all(r.data.params["train.method"] == "insilico" for r in screened)
    assert all(r.data.params["train.method"] == "pat" for r in promoted)
    # the promoted are the two best screened by their selected validation accuracy, measured on the device
    best = sorted(screened, key=lambda r: (-r.data.metrics["best_val_accuracy"], r.data.tags["physfarm.trial_id"]))
    assert {r.info.run_id for r in best[:2]} == {r.data.tags["physfarm.warm_start.run_id"] for r in promoted}
    assert {r.data.tags["physfarm.promoted"] for r in best[:2]} == {"true"}
    assert {r.data.tags["physfarm.promoted"] for r in best[2:]} == {"false"}
    by_id = {r.info.run_id: r for r in screened}
    for r in promoted:
        source = by_id[r.data.tags["physfarm.warm_start.run_id"]]
        assert r.data.tags["physfarm.warm_start.url"].endswith(f"/runs/{source.info.run_id}")
        assert float(r.data.tags["physfarm.device_s.fidelity0"]) == pytest.approx(
            source.data.metrics["device_s_total"], rel=1e-3)
        f1, f2 = (float(r.data.tags[f"physfarm.device_s.fidelity{k}"]) for k in (1, 2))
        assert f1 > 0 and f1 + f2 == pytest.approx(r.data.metrics["device_s_total"], rel=1e-3)
        # the source's hyperparameters go on, with its weights
        assert r.data.params["train.lr"] == source.data.params["train.lr"]
        assert r.data.params["train.init_from"] != "None"
    for r in screened:  # screened on the device: validation only, the test split left closed
        assert r.data.metrics["device_s_total"] > 0 and "test_accuracy" not in r.data.metrics
    parent = MlflowClient(store).get_run(outcome.parent_run_id)
    assert 0 < parent.data.metrics["device_budget_spent_s"] < 1000
    # both Tune runs log the budget on one clock (steps: seconds since the sweep's budget started), so
    # the figure the parent run shows, the latest by step, is the sweep's last one (not the screen's)
    history = sorted(MlflowClient(store).get_metric_history(outcome.parent_run_id, "device_budget_spent_s"),
                     key=lambda m: m.timestamp)
    assert [m.step for m in history] == sorted(m.step for m in history) and history[-1].step > 0
    assert parent.data.metrics["device_budget_spent_s"] == pytest.approx(
        read_marker(Path(outcome.path))["device_s_spent"], abs=1e-9)
    assert parent.data.metrics["device_budget_remaining_s"] == pytest.approx(
        1000 - parent.data.metrics["device_budget_spent_s"])
    assert len(outcome.rows) == 6 and all(r.status == "TERMINATED" for r in outcome.rows)


def test_mixed_methods_are_screened_on_the_twin_and_promoted_together(ray_session, tmp_path, store):
    """PAT and PhyLL in one sweep: each screened with the twin standing in for the device (PhyLL's
    screen measures the device for its one validation pass only), ranked together by validation on
    the device; the promoted PhyLL trial runs PhyLL on the device from its screen's weights, tagged as
    PAT's are."""
    train = {"method": {"grid": ["pat", "phyll"]}, "pat": {"batch_size": 8, "lr": 0.1},
             "phyll": {"lr": {"grid": [1e-6, 0.03]}, "train_eval_size": 0}}  # a PhyLL that cannot learn
    sweep = {"scheduler": {"kind": "multifidelity", "promote": 2, "keep": 1}}
    outcome = run_sweep(parse_config(_raw(tmp_path, "mfmixed", train, sweep)), tracking_uri=store)

    data = load_dataset(DataConfig(kind="digits", limit=200))
    n_train, n_val, blocks = len(data.y_train), len(data.y_val), 2  # PhyLL's default n_blocks
    runs = _children(store, outcome)
    screened = [r for r in runs if r.data.tags.get("physfarm.fidelities") == "0"]
    promoted = [r for r in runs if r.data.tags.get("physfarm.fidelities", "").startswith("0,1")]
    assert len(screened) == 3 and len(promoted) == 2 and len(runs) == 5
    assert sorted(r.data.params["train.method"] for r in screened) == ["insilico", "phyll", "phyll"]
    # ranked together: the two best screened by device validation, whatever their method
    best = sorted(screened, key=lambda r: (-r.data.metrics["best_val_accuracy"], r.data.tags["physfarm.trial_id"]))
    assert {r.info.run_id for r in best[:2]} == {r.data.tags["physfarm.warm_start.run_id"] for r in promoted}
    assert {r.data.tags["physfarm.promoted"] for r in best[:2]} == {"true"}
    assert best[2].data.params["train.lr"] == "1e-06" and best[2].data.tags["physfarm.promoted"] == "false"
    assert best[2].data.metrics["best_val_accuracy"] < 0.2 < best[1].data.metrics["best_val_accuracy"]
    assert sorted(r.data.params["train.method"] for r in promoted) == ["pat", "phyll"]

    screen = best[1] if best[1].data.params["train.method"] == "phyll" else best[0]
    run = next(r for r in promoted if r.data.params["train.method"] == "phyll")
    assert screen.data.params["train.in_silico"] == "True" and run.data.params["train.in_silico"] == "False"
    # the screen's device use: one validation pass (each block, every candidate label), nothing else
    assert screen.data.metrics["device_rows_total"] == blocks * n_val * data.n_classes
    assert "test_accuracy" not in screen.data.metrics
    # PhyLL on the device measures the training set each epoch besides: far more rows and seconds
    epochs = len(MlflowClient(store).get_metric_history(run.info.run_id, "loss"))  # one per epoch
    tested = blocks * len(data.y_test) * data.n_classes if "test_accuracy" in run.data.metrics else 0
    assert run.data.metrics["device_rows_total"] == epochs * blocks * (2 * n_train + n_val * data.n_classes) + tested
    assert run.data.metrics["device_s_total"] > 1.5 * screen.data.metrics["device_s_total"]
    tags = run.data.tags
    assert tags["physfarm.warm_start.run_id"] == screen.info.run_id
    assert tags["physfarm.warm_start.trial_id"] == screen.data.tags["physfarm.trial_id"]
    assert tags["physfarm.warm_start.url"].endswith(f"/runs/{screen.info.run_id}")
    assert float(tags["physfarm.device_s.fidelity0"]) == pytest.approx(screen.data.metrics["device_s_total"], rel=1e-3)
    f1, f2 = (float(tags[f"physfarm.device_s.fidelity{k}"]) for k in (1, 2))
    assert f1 > 0 and f1 + f2 == pytest.approx(run.data.metrics["device_s_total"], rel=1e-3)
    assert tags["physfarm.fidelities"] == ("0,1,2" if f2 > 0 else "0,1")
    assert run.data.params["train.init_from"] != "None"
    assert all(r.status == "TERMINATED" for r in outcome.rows)


def test_a_new_sweep_in_a_finished_ones_folder_runs_its_own_promotions(ray_session, tmp_path, store):
    """The same multifidelity sweep started again after it finished (same name, same folder): the new
    sweep screens and promotes for itself; the finished one's promoted Tune run is not restored into
    it, and its marker's budget figures do not carry over."""
    sweep = {"scheduler": {"kind": "multifidelity", "promote": 1, "keep": 1}, "device_budget_s": 1000}
    raw = _raw(tmp_path, "again", {"lr": {"grid": [0.01, 0.1]}, "epochs": 1}, sweep)
    first = run_sweep(parse_config(raw), tracking_uri=store)
    second = run_sweep(parse_config(raw), tracking_uri=store)
    assert second.parent_run_id != first.parent_run_id
    for outcome in (first, second):
        runs = _children(store, outcome)
        promoted = [r for r in runs if r.data.tags.get("physfarm.fidelities", "").startswith("0,1")]
        assert len(runs) == 3 and len(promoted) == 1 and promoted[0].info.status == "FINISHED", \
            [(r.info.run_name, r.info.status, r.data.tags.get("physfarm.fidelities")) for r in runs]
    marker = read_marker(Path(second.path))
    assert marker["parent_run_id"] == second.parent_run_id and marker["status"] == "finished"
    spent = MlflowClient(store).get_run(second.parent_run_id).data.metrics["device_budget_spent_s"]
    assert abs(marker["device_s_spent"] - spent) < 1e-6


def test_a_failed_screened_trial_does_not_hold_up_promotion(ray_session, tmp_path, store):
    """One configuration's device fails every call: its screen ends in ERROR, the other is promoted,
    and the sweep finishes (not 'interrupted')."""
    broken = {"name": "broken", "system": {"kind": "oscillators", "n": 16, "fault_rate": 1.0}}
    raw = _raw(tmp_path, "mffail", {"device": {"grid": ["osc", "broken"]}, "epochs": 1},
               {"scheduler": {"kind": "multifidelity", "promote": 1, "keep": 1}, "max_failures": 0},
               devices=(OSC, broken))
    outcome = run_sweep(parse_config(raw), tracking_uri=store)
    status = sorted((r.config["device"], r.status) for r in outcome.rows)
    assert status == [("broken", "ERROR"), ("osc", "TERMINATED"), ("osc", "TERMINATED")], status
    assert not outcome.interrupted and read_marker(Path(outcome.path))["status"] == "finished"
    children = _children(store, outcome)
    promoted = [r for r in children if "physfarm.warm_start.run_id" in r.data.tags]
    assert len(promoted) == 1 and promoted[0].data.params["train.device"] == "osc"
    # the failed screen's run says at which fidelity it failed, though it never reported a result
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags.get("physfarm.fidelities") == "0", \
        [(r.info.status, r.data.tags.get("physfarm.fidelities")) for r in children]


# ---- warm start ------------------------------------------------------------------------------------------
def test_warm_start_begins_at_the_in_silico_accuracy_not_at_chance(digits, tmp_path):
    """PAT with a learning rate too small to move anything in one epoch: warm-started, its first
    epoch's validation accuracy on the device is the in-silico training's; from scratch, chance."""
    device = Oscillators(n=16, seed=0)
    states = []
    insilico = train_insilico(InSilicoConfig(epochs=4, batch_size=32, lr=0.05, encoder=DOWN, final_test=False),
                              device, digits, report=lambda m, s: states.append(s))
    torch.save(states[-1], tmp_path / "state.pt")
    start = max(h["val_accuracy"] for h in insilico.history)
    assert start > 0.4  # the in-silico training learned (chance: 0.1)
    still = {"epochs": 1, "batch_size": 32, "lr": 1e-7, "encoder": DOWN, "final_test": False}
    warm = train_pat(PATConfig(**still, init_from=str(tmp_path)), device, digits)
    cold = train_pat(PATConfig(**still), device, digits)
    assert warm.history[0]["val_accuracy"] == pytest.approx(start, abs=0.05)  # device noise only
    assert cold.history[0]["val_accuracy"] < 0.3
    # the screen's in-silico training measures the validation split on the device once, at its end
    calls = []
    screen = train_insilico(InSilicoConfig(epochs=3, batch_size=32, lr=0.05, encoder=DOWN, final_test=False,
                                           device_val="selected"), device, digits,
                            report=lambda m, s: calls.append(m["device_calls"]))
    assert calls[:2] == [0, 0] and calls[2] == -(-len(digits.y_val) // 256)
    assert [h["val_accuracy"] != h["val_accuracy"] for h in screen.history] == [True, True, False]
    last = screen.history[-1]  # the device's figure is that of the weights the twin selected
    assert last["best_val_accuracy"] == last["val_accuracy"] and 1 <= last["best_epoch"] <= 3
    assert last["best_val_accuracy_twin"] == max(h["val_accuracy_twin"] for h in screen.history)
    with pytest.raises(ValueError, match="init_from"):
        train_pat(PATConfig(**still, init_from=str(tmp_path / "nowhere")), device, digits)


class Counted:
    """A device that counts the rows it measures."""

    def __init__(self, inner):
        self.inner, self.rows = inner, 0

    @property
    def spec(self):
        return self.inner.spec

    def forward(self, x, theta):
        self.rows += x.shape[0]
        return self.inner.forward(x, theta)

    def ideal_model(self):
        return self.inner.ideal_model()


def test_phyll_warm_start_begins_at_the_in_silico_accuracy_not_at_chance(digits, tmp_path):
    """PhyLL's screen trains with the twin standing in for the device and measures the device's
    validation once; warm-started from it (a learning rate too small to move anything), PhyLL's first
    epoch on the device is at that accuracy, its standardisation measured again on the device; from
    scratch, chance."""
    device = Oscillators(n=16, seed=0)
    counted, states, calls = Counted(device), [], []
    base = {"batch_size": 32, "encoder": DOWN, "final_test": False, "train_eval_size": 0}
    screen = train_phyll(PhyLLConfig(**base, epochs=4, lr=0.01, in_silico=True), counted, digits,
                         report=lambda m, s: (states.append(s), calls.append(m["device_calls"])))
    torch.save(states[-1], tmp_path / "state.pt")
    # the device measured one validation pass (every candidate label, each block), after the last epoch
    assert counted.rows == 2 * len(digits.y_val) * digits.n_classes and calls[:3] == [0, 0, 0] and calls[3] > 0
    assert [h["val_accuracy"] != h["val_accuracy"] for h in screen.history] == [True, True, True, False]
    last = screen.history[-1]
    assert last["best_val_accuracy"] == last["val_accuracy"] and 1 <= last["best_epoch"] <= 4
    assert last["best_val_accuracy_twin"] == max(h["val_accuracy_twin"] for h in screen.history)
    start = last["best_val_accuracy"]
    assert start > 0.35  # the in-silico training learned (chance: 0.1)

    still = {**base, "epochs": 1, "lr": 1e-7}
    warm = train_phyll(PhyLLConfig(**still, init_from=str(tmp_path)), device, digits)
    cold = train_phyll(PhyLLConfig(**still), device, digits)
    assert warm.history[0]["val_accuracy"] == pytest.approx(start, abs=0.1)  # 4 of 42 rows: noise, calibration
    assert cold.history[0]["val_accuracy"] < 0.25
    # the first measurement standardised the features again, on the device: block 0 measured the same
    # rows on it as the cold start did (same theta, same negatives), not the twin's
    source = states[-1]["selection"]["weights"]["blocks.0.mu"]
    mine, scratch = warm.state["model"]["blocks.0.mu"], cold.state["model"]["blocks.0.mu"]
    assert float((mine - scratch).abs().max()) < 0.2 * float((mine - source).abs().max())

    # another method's checkpoint, or another network's, is refused naming the field
    pat = []
    train_insilico(InSilicoConfig(epochs=1, batch_size=32, encoder=DOWN, final_test=False), device, digits,
                   report=lambda m, s: pat.append(s))
    torch.save(pat[-1], tmp_path / "pat.pt")
    with pytest.raises(ValueError, match=r"init_from: .*pat\.pt is a 'insilico' training's checkpoint"):
        train_phyll(PhyLLConfig(**still, init_from=str(tmp_path / "pat.pt")), device, digits)
    with pytest.raises(ValueError, match=r"init_from: .* is a 'phyll' training's checkpoint"):
        train_pat(PATConfig(epochs=1, batch_size=32, encoder=DOWN, init_from=str(tmp_path)), device, digits)
    with pytest.raises(ValueError, match="init_from: .* holds another network's weights"):
        train_phyll(PhyLLConfig(**still, n_blocks=1, init_from=str(tmp_path)), device, digits)


# ---- the budget ------------------------------------------------------------------------------------------
def _audit(device: str, sweep: str) -> list[dict]:
    """The device's audit records (actors/audit.py) of requests serving the sweep: the ground truth."""
    import os

    out = []
    for path in Path(os.environ["PHYSFARM_AUDIT_DIR"]).glob(f"{device}.*"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "duration_s" in rec and str(rec.get("run", "")).startswith(f"{sweep}/"):
                out.append(rec)
    return out


def test_budget_stops_the_sweep_within_one_call_per_running_trial(ray_session, tmp_path, store):
    """Two trials at once against a budget far below what they would use: the sweep ends when it is
    spent, and the device seconds used pass it by at most one device call per running trial."""
    slow = {"name": "slowosc", "system": {"kind": "oscillators", "n": 16, "seed": 0, "latency_call_s": 0.02}}
    budget = 1.5
    raw = _raw(tmp_path, "budget", {"seed": {"grid": [0, 1, 2, 3]}, "epochs": 50}, {"device_budget_s": budget,
                                                                              "trial_cpus": 1}, devices=(slow,))
    outcome = run_sweep(parse_config(raw), tracking_uri=store)
    records = _audit("slowosc", "budget")
    spent = sum(r["device_s"] for r in records)
    longest = max(r["duration_s"] for r in records)
    assert budget <= spent <= budget + 2 * longest  # 2 trials run at once (2 CPUs, 1 each)
    assert all(r.metrics.get("epoch", 0) < 50 for r in outcome.rows)  # none ran to its end
    assert {r.status for r in outcome.rows} <= {"TERMINATED", "STOPPED"}
    parent = MlflowClient(store).get_run(outcome.parent_run_id)
    # the budget counts what the device's audit log charged the sweep's trials
    assert parent.data.metrics["device_budget_spent_s"] == pytest.approx(spent, rel=1e-3)
    assert parent.data.tags["physfarm.budget_spent"] == "true"
    assert parent.data.metrics["device_budget_remaining_s"] <= 0
    assert parent.info.status == "FINISHED" and read_marker(Path(outcome.path))["status"] == "finished"


def test_console_shows_the_remaining_budget():
    from farm.budget import budget_line
    from farm.console import SweepView

    view = SweepView("sweep 'x'")
    assert not any("budget" in line for line in view.lines())
    view.budget = budget_line({"budget_s": 60.0, "spent_s": 61.5, "remaining_s": -1.5})
    assert view.lines()[1] == "  device budget: 0.0 s left of 60.0 s (61.5 s spent)"  # never a negative left


def test_console_labels_a_screened_trial_by_its_method_as_written_with_the_epochs_it_runs():
    """The live console's line of a PAT configuration screened in silico says method=pat (as the
    leaderboard does, and as a PhyLL one says phyll), with the screen's epochs."""
    from types import SimpleNamespace

    from farm.sweep import TrialDescription

    describe = TrialDescription(["method", "lr"], ["osc"])
    for method in ("pat", "phyll"):
        train = {"method": method, "device": "osc", "epochs": 6, "lr": 0.03}
        label, epochs = describe(SimpleNamespace(trial_id="t1", config={"train": train,
                                                                         "fidelity": {"stage": 0, "epochs": 3}}))
        assert f"method={method}" in label and "insilico" not in label and epochs == 3, (label, epochs)
        label, epochs = describe(SimpleNamespace(trial_id="t2", config={"train": train}))
        assert f"method={method}" in label and epochs == 6


# ---- checks before Ray -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sweep, train, needle", [
    ({"device_budget_s": 0}, {}, "sweep.device_budget_s: a budget of 0"),
    ({"scheduler": {"kind": "multifidelity", "promote": 5}}, {"seed": {"grid": [0, 1, 2]}}, "sweep.scheduler.promote: 5 of 3"),
    ({"scheduler": {"kind": "multifidelity", "keep": 3, "promote": 2}}, {"seed": {"grid": [0, 1, 2]}},
     "sweep.scheduler.keep: 3"),
    ({"scheduler": {"kind": "multifidelity"}}, {"method": {"grid": ["pat", "phyll", "digital"]}},
     "train.method: 'digital' with sweep.scheduler kind 'multifidelity'.* Allowed: pat, phyll"),
    ({"scheduler": {"kind": "multifidelity"}}, {"method": "phyll", "in_silico": True},
     "train.in_silico: set by sweep.scheduler kind 'multifidelity' itself"),
    ({"scheduler": {"kind": "multifidelity"}}, {"method": {"grid": ["pat", "phyll"]}, "phyll": {"in_silico": False}},
     "train.phyll.in_silico: set by sweep.scheduler kind 'multifidelity' itself"),
    ({}, {"method": "phyll", "in_silico": "sometimes"}, "train.in_silico"),
    ({"scheduler": {"kind": "multifidelity", "perturbation_interval": 1}}, {}, "not a setting of kind 'multifidelity'"),
    ({"scheduler": {"kind": "multifidelity", "time_attr": "training_iteration"}}, {}, "time_attr: 'training_iteration'"),
    ({"scheduler": {"kind": "asha", "promote": 2}}, {}, "sweep.scheduler.promote: not a setting of kind 'asha'"),
])
def test_bad_strategy_settings_fail_before_ray_naming_the_field(tmp_path, sweep, train, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_config(_raw(tmp_path, "bad", train, sweep))


# ---- resume ------------------------------------------------------------------------------------------------
def _promoted_runs(db: Path) -> int:
    return store_count(db, "select count(*) from tags where key = 'physfarm.warm_start.run_id'")


def test_resumed_multifidelity_sweep_keeps_its_fidelity_history(tmp_path, monkeypatch):
    """Stopped (SIGTERM) once its promoted PAT trials have started, then resumed: the screen is not
    rerun, the same configurations stay promoted from the same in-silico runs, and no run is doubled."""
    monkeypatch.setenv("RAY_ADDRESS", "local")
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    raw = _raw(tmp_path, "mfres", {"seed": {"grid": [0, 1, 2]}, "epochs": 6},
               {"scheduler": {"kind": "multifidelity", "promote": 2, "keep": 2, "screen_epochs": 1},
                "max_concurrent_trials": 1, "device_budget_s": 500})
    raw["tracking"]["uri"] = uri
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc, err = sweep_signalled_when(path, tmp_path, lambda: _promoted_runs(db) >= 1, signal.SIGTERM,
                                     "no promoted trial started")
    assert proc.returncode == 130, err[-3000:]
    folder = tmp_path / "ray_results" / "mfres"
    before = read_marker(folder)
    assert before["status"] == "interrupted" and len(before["fidelity"]["promoted"]) == 2
    spent_before = before["device_s_spent"]
    assert spent_before > 0

    from farm.config import load_config

    outcome = run_sweep(load_config(path), resume=True)
    after = read_marker(folder)
    assert after["status"] == "finished" and after["fidelity"]["promoted"] == before["fidelity"]["promoted"]
    # the budget counts on from the first run, without counting again what the restarted device
    # replayed from its audit log: it is what the log charged the sweep in both runs (up to the calls
    # in flight when the first run was stopped)
    charged = sum(r["device_s"] for r in _audit("osc", "mfres"))  # both fidelities: mfres/... and mfres/promoted/...
    assert spent_before < after["device_s_spent"] <= charged + 1e-3  # the log rounds each record to 1 us
    assert after["device_s_spent"] == pytest.approx(charged, abs=0.05)
    client = MlflowClient(uri)
    runs = client.search_runs([outcome.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")
    screened = [r for r in runs if r.data.tags.get("physfarm.fidelities") == "0"]
    promoted = [r for r in runs if "physfarm.warm_start.run_id" in r.data.tags]
    assert len(screened) == 3 and len(promoted) == 2 and len(runs) == 5  # nothing rerun or doubled
    assert {r.data.tags["physfarm.warm_start.trial_id"] for r in promoted} == set(before["fidelity"]["promoted"])
    assert all(r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics for r in promoted)  # ran to the end
    assert all(r.data.tags["physfarm.fidelities"].startswith("0,1") for r in promoted)
