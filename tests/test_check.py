"""`physfarm sweep --check` refuses, before Ray starts, sweeps that could never run: trials that
need more CPUs than the local Ray will have, devices with fewer outputs than the data has classes.
Real subprocesses of the CLI; nothing may be written."""
from __future__ import annotations

import subprocess
import sys

import yaml


def _check(tmp_path, raw: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, "-m", "farm.cli", "sweep", str(path), "--check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_check_refuses_more_cpus_per_trial_than_the_local_ray_has(tmp_path):
    from farm.sweep import usable_cpus

    raw = {"devices": [{"name": "osc", "system": {"kind": "oscillators", "n": 16}}],
           "data": {"kind": "digits", "limit": 100},
           "train": {"method": "pat", "epochs": 1, "encoder": {"kind": "downsample", "size": [4, 4]}},
           "sweep": {"trial_cpus": usable_cpus() + 1}}
    proc = _check(tmp_path, raw)
    assert proc.returncode == 2
    assert "sweep.trial_cpus" in proc.stderr and f"at most {usable_cpus()}" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_check_refuses_a_device_with_fewer_outputs_than_classes(tmp_path):
    raw = {"devices": [{"name": "osc", "system": {"kind": "oscillators", "n": 8}}],
           "data": {"kind": "digits", "limit": 100},
           "train": {"method": "pat", "epochs": 1, "encoder": {"kind": "downsample", "size": [2, 4]}}}
    proc = _check(tmp_path, raw)
    assert proc.returncode == 2
    assert "8 outputs" in proc.stderr and "10 classes" in proc.stderr and "n_outputs >= 10" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()
    raw["devices"][0]["system"]["n"] = 16  # the fix the message names
    raw["train"]["encoder"]["size"] = [4, 4]
    assert _check(tmp_path, raw).returncode == 0
