"""The multifidelity strategy (farm.fidelity) on a standing pool and under leases, on a real lab cluster
(`ray start` processes, the `lab` fixture of conftest.py): sweeps, pool commands and other people's
clients each run as `physfarm` would, in processes of their own that join with --address.

- a standing device serves the screen and the promoted trials as it is (no device started or stopped by
  the sweep), and the device budget counts this sweep's device seconds only: not what the device had
  counted before (the baseline), not another person's use meanwhile; twin data collection counts;
- a lease held for the sweep (holder: the sweep's name) admits both fidelities;
- another holder's lease refuses the screen's device validation (policy refuse): each trial ends once,
  naming the lease and its holder; under policy wait the sweep waits for the release, then goes on.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import physfarm
from farm.tracking import PARENT_TAG

REPO = Path(__file__).resolve().parents[1]
DOWN = {"kind": "downsample", "size": [4, 4]}
POOL = {"devices": [
    {"name": "optics", "system": {"kind": "oscillators", "n": 16, "latency_call_s": 0.002},
     "resources": {"device_x": 1}},
    {"name": "queued", "system": {"kind": "oscillators", "n": 16, "latency_call_s": 0.002},
     "lease_policy": "wait"},
]}


@pytest.fixture(scope="module")
def pool(lab):
    path = lab["root"] / "pool.yaml"
    path.write_text(yaml.safe_dump(POOL))
    up = physfarm("devices", "up", str(path), "--address", lab["address"], env=lab["env"])
    assert up.returncode == 0, up.stderr[-3000:]
    return path  # the devices go with the lab's cluster


# A person's client: forward calls on DEVICE as CLIENT for SECONDS (at least one), PAUSE s apart.
USE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from farm.client import DeviceClient
    from farm.raycluster import join
    address, device, client, seconds, pause = sys.argv[1:4] + [float(a) for a in sys.argv[4:6]]
    join(address)
    dev = DeviceClient(device, client_id=client).connect()
    x, theta = np.full((64, dev.spec.n_inputs), 0.1, np.float32), np.zeros(dev.spec.n_params, np.float32)
    end = time.time() + seconds
    try:
        while True:
            dev.forward(x, theta)
            if time.time() >= end:
                break
            time.sleep(pause)
        print("served")
    except Exception as err:
        print("refused:", str(err).splitlines()[-1])
""")


def _use(lab, device: str, client: str, seconds: float = 0.0, pause: float = 0.0, env=None, wait=True):
    args = [sys.executable, "-c", USE, lab["address"], device, client, str(seconds), str(pause)]
    if not wait:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env or lab["env"], cwd=REPO)
    out = subprocess.run(args, capture_output=True, text=True, env=env or lab["env"], cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def _audit(lab, device: str) -> list[dict]:
    """The device's audit log (on its node: the lab's HOME, no PHYSFARM_AUDIT_DIR exported there)."""
    return [json.loads(line) for path in sorted((lab["home"] / ".physfarm" / "audit").glob(f"{device}.*.jsonl"))
            for line in path.read_text().splitlines()]


def _of(records: list[dict], sweep: str) -> list[dict]:
    """The request records of a sweep's trials: `<sweep>/<trial>` (the screen), `<sweep>/promoted/<trial>`."""
    return [r for r in records if "event" not in r and str(r.get("run", "")).startswith(f"{sweep}/")]


def _promoted(record: dict) -> bool:
    return record["run"].split("/")[1] == "promoted"


def _sweep_file(lab, tmp_path: Path, name: str, device: str, train: dict | None = None,
                sweep: dict | None = None) -> Path:
    raw = {
        # the sweep's own entry for the device: not used, since a device of that name is up
        "devices": [{"name": device, "system": {"kind": "oscillators", "n": 16}}],
        "data": {"kind": "digits", "limit": 120},
        "train": {"method": "pat", "device": device, "epochs": 2, "batch_size": 32, "encoder": DOWN, **(train or {})},
        "sweep": {"name": name, "trial_cpus": 1, "storage_path": str(tmp_path / "ray_results"),
                  "scheduler": {"kind": "multifidelity", "promote": 1, "keep": 1, "screen_epochs": 1},
                  **(sweep or {})},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": name},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _sweep(lab, path: Path, env: dict, wait=True):
    args = [sys.executable, "-m", "farm.cli", "sweep", str(path), "--address", lab["address"], "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=path.parent)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=400)
    return proc.returncode, out, err


def _runs(path: Path, name: str) -> tuple[dict, list]:
    store = MlflowClient(f"sqlite:///{path.parent / 'mlflow.db'}")
    exp = store.get_experiment_by_name(name)
    runs = store.search_runs([exp.experiment_id])
    parent = next(r for r in runs if PARENT_TAG not in r.data.tags)
    return parent, [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]


def _fidelities(children: list) -> tuple[list, list]:
    screened = [r for r in children if r.data.tags.get("physfarm.fidelities") == "0"]
    promoted = [r for r in children if r.data.tags.get("physfarm.fidelities", "").startswith("0,1")]
    return screened, promoted


def _ls(lab) -> dict:
    out = physfarm("devices", "ls", "--address", lab["address"], "--json", env=lab["env"])
    assert out.returncode == 0, out.stderr[-3000:]
    return {(r["device"], r["replica"]): r for r in json.loads(out.stdout)}


def _starts(lab, device: str) -> list[int]:
    return [r["pid"] for r in _audit(lab, device) if r.get("event") == "start"]


# ---- a standing pool -----------------------------------------------------------------------------------
def test_multifidelity_sweep_on_a_standing_device_counts_only_its_own_device_seconds(lab, pool, tmp_path):
    """The screen (with its twin's data collection) and the promoted PAT trial run on the standing
    `optics`, which the sweep neither starts again nor stops. The budget it reports is what the audit
    log charged its trials: not the device seconds the device had counted before the sweep under the
    sweep's own prefix (its baseline), nor another person's use while the sweep ran."""
    assert _use(lab, "optics", "mfpool/earlier", seconds=1.0) == "served"  # counted before: the baseline
    started = _starts(lab, "optics")
    assert len(started) == 1  # the pool's actor (its audit log's start line comes with its first request)
    twin = {"kind": "calibrated", "samples": 256, "thetas": 8, "steps": 30, "cache": False}
    path = _sweep_file(lab, tmp_path, "mfpool", "optics", {"lr": {"grid": [0.003, 0.1]}, "twin": twin},
                       {"device_budget_s": 100})
    carol = _use(lab, "optics", "carol/notebook", seconds=30.0, pause=0.02, wait=False)  # meanwhile
    try:
        rc, out, err = _sweep(lab, path, lab["env"] | {"PHYSFARM_USER": "alice"})
    finally:
        carol_out, carol_err = carol.communicate(timeout=120)
    assert rc == 0, (out[-2000:], err[-3000:])
    assert carol.returncode == 0 and carol_out.strip() == "served", carol_err[-2000:]

    parent, children = _runs(path, "mfpool")
    screened, promoted = _fidelities(children)
    assert len(screened) == 2 and len(promoted) == 1 and len(children) == 3
    assert all(r.info.status == "FINISHED" for r in children)
    # the standing device served both fidelities, and is still the pool's, up and answering
    records = _audit(lab, "optics")
    mine = [r for r in _of(records, "mfpool") if r["run"] != "mfpool/earlier"]
    assert {_promoted(r) for r in mine} == {False, True}
    assert all(r["outcome"] == "ok" for r in mine)
    assert _starts(lab, "optics") == started
    row = _ls(lab)[("optics", 0)]
    assert row["status"] == "alive" and row["restarts"] == 0
    assert _use(lab, "optics", "later/notebook") == "served"
    # twin data collection went through the standing device as the screened trials' own requests
    by_run: dict[str, int] = {}
    for r in mine:
        by_run[r["run"]] = by_run.get(r["run"], 0) + r["rows"]
    screen_rows = [rows for run, rows in by_run.items() if run.count("/") == 1]
    assert len(screen_rows) == 2 and min(screen_rows) >= 256 + 1
    # the budget: what the log charged this sweep's trials, nothing else
    earlier = sum(r["device_s"] for r in records if r.get("run") == "mfpool/earlier")
    others = [r for r in records if r.get("run") == "carol/notebook"]
    during = [r for r in others if mine[0]["t"] <= r["t"] <= mine[-1]["t"]]
    assert earlier > 0.1 and during  # there was something not to count
    charged = sum(r["device_s"] for r in mine)
    marker = json.loads((tmp_path / "ray_results" / "mfpool" / "physfarm_sweep.json").read_text())
    assert marker["device_s_spent"] == pytest.approx(charged, abs=1e-3)
    assert parent.data.metrics["device_budget_spent_s"] == pytest.approx(charged, abs=1e-3)
    assert parent.data.metrics["device_budget_remaining_s"] == pytest.approx(100 - charged, abs=1e-3)
    assert f"({charged:.1f} s spent)" in out


# ---- leases ------------------------------------------------------------------------------------------------
def test_a_lease_held_for_the_sweep_admits_both_fidelities(lab, pool, tmp_path):
    """`devices lease optics --holder mflease`: the sweep named so is served, its screen (`mflease/...`)
    and its promoted trial (`mflease/promoted/...`) alike; anyone else is refused meanwhile."""
    alice = lab["env"] | {"PHYSFARM_USER": "alice"}
    took = physfarm("devices", "lease", "optics", "--for", "10m", "--holder", "mflease", "--address",
                    lab["address"], env=alice)
    assert took.returncode == 0, took.stderr
    try:
        path = _sweep_file(lab, tmp_path, "mflease", "optics")
        rc, out, err = _sweep(lab, path, alice)
        refused = _use(lab, "optics", "carol/notebook")
    finally:
        gave = physfarm("devices", "release", "optics", "--address", lab["address"], env=alice)
        assert gave.returncode == 0, gave.stderr
    assert rc == 0, (out[-2000:], err[-3000:])
    assert refused.startswith("refused:") and "reserved by 'mflease'" in refused  # the lease held all along
    _parent, children = _runs(path, "mflease")
    screened, promoted = _fidelities(children)
    assert len(screened) == 1 and len(promoted) == 1
    assert all(r.info.status == "FINISHED" for r in children)
    assert float(promoted[0].data.tags["physfarm.device_s.fidelity1"]) > 0
    mine = _of(_audit(lab, "optics"), "mflease")
    assert mine and all(r["outcome"] == "ok" for r in mine)
    assert any(_promoted(r) for r in mine)


def test_another_holders_lease_refuses_the_screen_once_per_trial(lab, pool, tmp_path):
    """Policy refuse: the screen's device validation is refused; each screened trial ends at once,
    FAILED with the refusal naming the device, the lease and its holder (not retried: one refused request
    per trial in the audit log), and nothing is promoted."""
    alice, bob = lab["env"] | {"PHYSFARM_USER": "alice"}, lab["env"] | {"PHYSFARM_USER": "bob"}
    took = physfarm("devices", "lease", "optics", "--for", "10m", "--address", lab["address"], env=alice)
    assert took.returncode == 0, took.stderr
    try:
        path = _sweep_file(lab, tmp_path, "mfrefused", "optics", {"lr": {"grid": [0.003, 0.1]}},
                           {"max_failures": 2})
        rc, out, err = _sweep(lab, path, bob)
    finally:
        gave = physfarm("devices", "release", "optics", "--address", lab["address"], env=alice)
        assert gave.returncode == 0, gave.stderr
    assert rc == 1, (out[-2000:], err[-3000:])  # every trial failed
    _parent, children = _runs(path, "mfrefused")
    assert len(children) == 2 and all(r.info.status == "FAILED" for r in children)
    assert all(r.data.tags["physfarm.method"] == "insilico" for r in children)  # the screen's
    for r in children:
        assert r.data.tags["physfarm.error"].startswith(
            "DeviceLeasedError: device 'optics' (optics#0) is reserved by 'alice' until "), r.data.tags
    mine = _of(_audit(lab, "optics"), "mfrefused")
    assert sorted(r["outcome"].split(":")[0] for r in mine) == ["refused", "refused"]  # once per trial
    assert len({r["run"] for r in mine}) == 2
    assert not (tmp_path / "ray_results" / "mfrefused" / "mfrefused.promoted").exists()


def test_under_policy_wait_the_sweep_waits_for_the_release_then_runs_both_fidelities(lab, pool, tmp_path):
    """Policy wait: the screen's device validation waits in the queue while alice's lease holds the
    device; once she releases it the sweep goes on through both fidelities, nothing refused."""
    alice, bob = lab["env"] | {"PHYSFARM_USER": "alice"}, lab["env"] | {"PHYSFARM_USER": "bob"}
    took = physfarm("devices", "lease", "queued", "--for", "10m", "--address", lab["address"], env=alice)
    assert took.returncode == 0, took.stderr
    path = _sweep_file(lab, tmp_path, "mfwait", "queued")
    proc = _sweep(lab, path, bob, wait=False)
    try:
        deadline = time.monotonic() + 180
        while _ls(lab)[("queued", 0)]["queued_requests"] < 1:  # the screen's validation, held back
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the sweep sent no request to the leased device"
            time.sleep(1.0)
        time.sleep(2.0)
        released = time.time()
        gave = physfarm("devices", "release", "queued", "--address", lab["address"], env=alice)
        assert gave.returncode == 0, gave.stderr
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out[-2000:], err[-3000:])
    _parent, children = _runs(path, "mfwait")
    screened, promoted = _fidelities(children)
    assert len(screened) == 1 and len(promoted) == 1
    assert all(r.info.status == "FINISHED" for r in children)
    mine = _of(_audit(lab, "queued"), "mfwait")
    assert mine and all(r["outcome"] == "ok" for r in mine)
    assert min(r["t"] for r in mine) >= released  # served only once the lease had ended
    assert any(_promoted(r) for r in mine)
