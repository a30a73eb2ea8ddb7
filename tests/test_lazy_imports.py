"""What a command or a trial imports: nothing heavy it does not use (issue: a sweep costs what its
trainings cost). Each check runs in a fresh interpreter and reads its sys.modules."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torch._dynamo", "mlflow", "ray.tune", "sklearn", "matplotlib")


def loaded_after(code: str) -> set[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["sweep", "--help"], ["devices", "--help"]], ids=" ".join)
def test_the_cli_help_imports_no_torch_mlflow_or_tune(argv):
    code = f"from farm.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert loaded_after(code) == set()


def test_importing_the_trainable_and_the_sweep_module_imports_no_torch():
    # The sweep's driver and each trial worker import these first; torch comes when it is used.
    assert loaded_after("import farm.trainable") == set()
    assert {"torch", "torch._dynamo", "sklearn", "matplotlib"} & loaded_after("import farm.sweep") == set()


def test_sweep_check_imports_no_mlflow_or_tune():
    # `physfarm sweep --check` starts nothing, so it needs neither
    code = "from farm.cli import main\nassert main(['sweep', 'examples/quickstart.yaml', '--check']) == 0"
    assert not loaded_after(code) & {"torch._dynamo", "mlflow", "ray.tune", "matplotlib"}


def test_checking_a_config_never_imports_torch_dynamo_or_mlflow():
    # `--check` builds each trial's network (torch), but on the CPU: no torch._dynamo, no MLflow
    loaded = loaded_after("from farm.config import load_config\nload_config('examples/quickstart.yaml')")
    assert "torch" in loaded and not loaded & {"torch._dynamo", "mlflow", "ray.tune", "matplotlib"}


def test_a_trial_training_from_the_drivers_arrays_imports_no_sklearn_or_dynamo():
    # What a trial's worker runs: the data handed over as arrays (farm.data.load_arrays in the driver),
    # a PAT training of one epoch on a local simulator; no scikit-learn, no torch._dynamo, no MLflow.
    code = (
        "import pickle, sys\n"
        "arrays = pickle.loads(sys.stdin.buffer.read())\n"
        "from actors.systems.registry import build_system\n"
        "from farm.data import dataset_from\n"
        "from trainers.config import PATConfig\n"
        "from trainers.pat import train_pat\n"
        "data = dataset_from(arrays)\n"
        "cfg = PATConfig.model_validate({'method': 'pat', 'epochs': 1, 'batch_size': 64})\n"
        "result = train_pat(cfg, build_system({'kind': 'oscillators', 'seed': 0}), data)\n"
        "assert result.history[-1]['epoch'] == 1\n"
    )
    import pickle

    from farm.data import DataConfig, load_arrays

    arrays = load_arrays(DataConfig(kind="digits", limit=200))
    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, input=pickle.dumps(arrays), capture_output=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:].decode()
    loaded = set(json.loads(out.stdout.decode().strip().splitlines()[-1]))
    assert "torch" in loaded and not loaded & {"sklearn", "torch._dynamo", "mlflow", "matplotlib"}


def test_the_trial_sees_the_same_data_as_loading_it_itself():
    import torch

    from farm.data import DataConfig, dataset_from, load_arrays, load_dataset

    cfg = DataConfig(kind="digits", limit=300)
    a, b = dataset_from(load_arrays(cfg)), load_dataset(cfg)
    for split in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        ta, tb = getattr(a, split), getattr(b, split)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb)
    assert (a.n_classes, a.image_shape, a.name) == (b.n_classes, b.image_shape, b.name)
