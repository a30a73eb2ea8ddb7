"""Trained networks as MLflow models: logged by every trial, loaded back through mlflow.pyfunc with
the trainer's predictions, the best trial registered, `physfarm eval` on a drifted device; the runs
carry what makes them readable alone; help and config errors import no torch."""
from __future__ import annotations

import subprocess
import sys

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from actors.systems.oscillators import Oscillators
from farm.config import parse_config
from farm.data import DataConfig, load_dataset
from farm.mlflow_ops import tracking_uri_scope
from farm.models import bind, meta_of, save_model
from farm.tracking import PARENT_TAG
from trainers.config import PATConfig
from trainers.pat import train_pat

DOWN = {"kind": "downsample", "size": [4, 4]}
SYSTEM = {"kind": "oscillators", "n": 16, "seed": 0, "noise": 0.0}  # noise off: a device measures the same twice


def test_a_saved_model_predicts_like_the_trainer_on_the_device_and_offline_on_the_twin(tmp_path):
    data = load_dataset(DataConfig(kind="digits", limit=300))
    result = train_pat(PATConfig(epochs=2, batch_size=16, lr=0.05, encoder=DOWN), Oscillators(SYSTEM), data)
    path = save_model(tmp_path, result.state, {"device": SYSTEM}, {"kind": "digits", "limit": 300}, data.shape,
                      data.x_train[:3].numpy())
    model = mlflow.pyfunc.load_model(str(path))
    assert meta_of(model)["method"] == "pat" and meta_of(model)["devices"] == {"device": SYSTEM}
    offline = model.predict(data.x_test.numpy())  # on the twin: the ideal model, no device
    assert offline.dtype == np.int64 and offline.shape == (len(data.y_test),)
    bind(model, Oscillators(SYSTEM))
    on_device = model.predict(data.x_test.numpy())
    assert np.array_equal(on_device, result.state["test_predictions"].numpy())  # the trainer's final pass
    assert float((on_device == data.y_test.numpy()).mean()) == pytest.approx(result.test_accuracy)
    with pytest.raises(Exception, match=r"does not match expected shape \(-1, 64\)"):
        model.predict(np.zeros((2, 10), dtype=np.float32))  # MLflow enforces the signature


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    """A 2-trial sweep (lr grid), tracked in SQLite: its store URI and outcome."""
    from farm.sweep import run_sweep

    root = tmp_path_factory.mktemp("models")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = parse_config({
        "devices": [{"name": "osc", "system": SYSTEM}],
        "data": {"kind": "digits", "limit": 500},
        "train": {"method": "pat", "epochs": 3, "batch_size": 16, "lr": {"grid": [0.002, 0.05]}, "encoder": DOWN,
                  "rescale_init": "data"},
        "sweep": {"name": "models", "trial_cpus": 1, "storage_path": str(root / "ray_results")},
        "tracking": {"experiment": "models", "model_name": "digits-osc", "user": "ada"},
    })
    return uri, run_sweep(cfg, tracking_uri=uri)


def test_every_trial_logs_a_model_and_the_best_is_registered(swept):
    uri, outcome = swept
    client = MlflowClient(uri)
    best = outcome.leaderboard()[0]
    versions = client.search_model_versions("name = 'digits-osc'")
    assert [v.run_id for v in versions] == [best.run_id]  # one version: the best trial by validation
    with tracking_uri_scope(uri):
        registered = mlflow.pyfunc.load_model("models:/digits-osc/1")
    data = load_dataset(DataConfig(kind="digits", limit=500))
    bind(registered, Oscillators(SYSTEM))
    pred = registered.predict(data.x_test.numpy())
    assert float((pred == data.y_test.numpy()).mean()) == pytest.approx(best.metrics["test_accuracy"])
    with tracking_uri_scope(uri):
        for row in outcome.rows:
            assert mlflow.pyfunc.load_model(f"runs:/{row.run_id}/model") is not None


def test_runs_read_well_alone(swept):
    uri, outcome = swept
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("models")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")
    assert sorted(r.info.run_name for r in runs) == ["lr=0.002", "lr=0.05"]  # what varies
    for run in runs:
        params, tags = run.data.params, run.data.tags
        assert params["device.osc.kind"] == "oscillators" and params["device.osc.n"] == "16"
        assert params["data.kind"] == "digits" and params["train.encoder.kind"] == "downsample"
        assert int(params["model.n_physical_params"]) == 16 * 16 + 16 and "model.n_digital_params" in params
        assert "n_physical_params" not in run.data.metrics  # constants are params, not flat charts
        assert "lr" not in run.data.metrics  # a constant learning rate is the param train.lr
        assert {"device_s_total", "queue_wait_s_total", "device_calls"} <= set(run.data.metrics)
        assert tags["mlflow.user"] == "ada" and tags["physfarm.version"]
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["digits"]


def test_eval_on_a_drifted_device_shows_the_drop(swept, capsys, monkeypatch):
    import os

    from farm.cli import main

    uri, outcome = swept
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()
    assert main(["eval", "models:/digits-osc/1", "--tracking-uri", uri]) == 0
    # eval leaves no MLFLOW_TRACKING_URI behind for a later sweep or subprocess to write to
    assert "MLFLOW_TRACKING_URI" not in os.environ
    same = capsys.readouterr().out
    assert main(["eval", "models:/digits-osc/1", "--tracking-uri", uri, "--set", "drift=500"]) == 0
    drifted = capsys.readouterr().out

    def accuracy(text: str) -> float:
        return float(text.split("test_accuracy ")[1].split()[0])

    best = outcome.leaderboard()[0]
    assert accuracy(same) == pytest.approx(best.metrics["test_accuracy"], abs=1e-4)  # noise off: the same pass
    assert accuracy(drifted) < accuracy(same) - 0.1
    evals = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("physfarm-eval").experiment_id])
    assert len(evals) == 2 and all(r.data.tags["physfarm.model_uri"] == "models:/digits-osc/1" for r in evals)
    assert {"set.drift": "500"}.items() <= max(evals, key=lambda r: len(r.data.params)).data.params.items()


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120)
    return set(out.stdout.split())


def test_help_and_config_errors_import_no_torch(tmp_path):
    helped = _modules_after("import farm.cli\n"
                            "for cmd in (['--help'], ['sweep', '--help'], ['eval', '--help'], ['instrument', 'serve', '--help']):\n"
                            "    try:\n        farm.cli.main(cmd)\n    except SystemExit:\n        pass")
    assert helped and not {"torch", "ray", "mlflow"} & {m.split(".")[0] for m in helped}
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices:\n  - name: osc\n    system: {kind: oscillators}\ntrain: {epoch: 3}\n")
    refused = _modules_after(f"import farm.cli\nassert farm.cli.main(['sweep', {str(bad)!r}]) == 2")
    assert refused and not {"torch", "ray", "mlflow"} & {m.split(".")[0] for m in refused}


def test_torch_free_modules_stay_so():
    """What the config check imports (system and trainer configs) must not pull in the physics."""
    mods = _modules_after("import actors.systems.configs, actors.instrument.config, trainers.config, "
                          "trainers.registry, farm.config")
    assert mods and "torch" not in {m.split(".")[0] for m in mods}
