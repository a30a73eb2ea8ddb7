"""The audit log: every request a device serves, refuses or fails, with its user and run, in a JSON-lines
file on the device's node that survives actor restarts; accounting rebuilt from it after a restart;
`physfarm devices audit` prints and exports it; the sweep's console tells a restart."""
from __future__ import annotations

import csv
import io
import json
import threading
import time

import numpy as np
import pytest
import ray

from actors.audit import AuditLog, read, replay, theta_hash
from actors.errors import EnvelopeError
from farm.cli import main as cli_main
from farm.client import DeviceClient
from farm.config import DeviceConfig
from farm.pool import find_device, start_device, stop_device

N = 8
THETA = np.zeros(N * N + N, np.float32)


def _x(rows: int, value: float = 0.1) -> np.ndarray:
    return np.full((rows, N), value, np.float32)


# -- the file, without Ray -------------------------------------------------------------------------------
def test_a_call_is_one_line_per_request_and_replay_follows_the_lineage(tmp_path):
    log = AuditLog(tmp_path / "d.0.jsonl", clock=lambda: 1000.0)
    log.started(restarted=False)
    theta = np.arange(4, dtype=np.float32)
    log.call(1000.5, 0.01, [("alice", "a/1", 3, theta, 0.0075, 0.001), ('bo"b', "b/1", 1, theta, 0.0025, 0.0)])
    log.refused("carol", "c/1", 5, theta, "DeviceLeasedError: reserved")
    log.started(restarted=True)  # a restart: the lineage goes on
    log.call(1001.0, 0.02, [("alice", "a/1", 2, theta, 0.02, 0.0)], outcome="error: DeviceError: boom")
    log.close()
    lines = (tmp_path / "d.0.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(ln) for ln in lines)  # each line is JSON, names escaped
    recs = list(read(tmp_path / "d.0.jsonl"))
    first = recs[1]
    assert (first["user"], first["run"], first["rows"], first["outcome"], first["k"]) == ("alice", "a/1", 3, "ok", 0)
    assert first["theta"] == theta_hash(theta) == theta_hash(theta.copy()) != theta_hash(theta + 1)
    assert recs[2]["user"] == 'bo"b' and recs[3]["outcome"].startswith("refused: DeviceLeasedError")
    old = replay(recs)
    assert (old.calls, old.requests, old.rows, old.errors, old.refused, old.restarts) == (1, 2, 4, 1, 1, 1)
    assert old.clients["a/1"].rows == 3 and old.clients["a/1"].user == "alice"
    # A fresh start (the device stopped and started again) begins a new lineage.
    with (tmp_path / "d.0.jsonl").open("a") as f:
        f.write(json.dumps({"t": 1002.0, "event": "start", "restarted": False}) + "\n")
        f.write('{"t": 1002.5, "user": "alice", "run": "a/2", "rows": 1, "outcome": "ok", "k": 0}\n')
        f.write('{"t": 1003.0, "user": "torn')  # a write cut by a crash
    new = replay(read(tmp_path / "d.0.jsonl"))
    assert (new.calls, new.requests, new.restarts, list(new.clients)) == (1, 1, 0, ["a/2"])
    assert [r["t"] for r in read(tmp_path / "d.0.jsonl", since=1001.0) if "event" not in r] == [1001.0, 1002.5]


def test_a_write_that_fails_is_counted_not_raised(tmp_path):
    (tmp_path / "blocked").write_text("a file where the folder should be")
    log = AuditLog(tmp_path / "blocked" / "d.0.jsonl")
    log.call(0.0, 0.01, [("u", "r", 1, THETA, 0.01, 0.0)])
    assert log.errors == 1 and "blocked" in log.last_error


# -- on a real Ray -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audited(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit")
    handles = start_device(DeviceConfig(name="aud", system={"kind": "oscillators", "n": N, "latency_call_s": 0.01},
                                        max_restarts=3, audit_dir=str(folder)))
    yield folder
    del handles
    stop_device("aud")


def _restarted(handle, wait_s: float = 60.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if ray.get(handle.info.remote(), timeout=10)["restarted"]:
                return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    return False


def test_every_answered_request_is_in_the_log_and_accounting_survives_a_restart(audited):
    alice = DeviceClient("aud", client_id="alice-sweep/t1", user="alice", retries=5, backoff_s=0.05).connect()
    bob = DeviceClient("aud", client_id="bob-nb", user="bob", retries=5, backoff_s=0.05).connect()
    answered = {"alice": 0, "bob": 0}

    def send(client, who, n):
        for _ in range(n):
            client.forward(_x(4), THETA)
            answered[who] += 1

    threads = [threading.Thread(target=send, args=(alice, "alice", 60)),
               threading.Thread(target=send, args=(bob, "bob", 60))]
    [t.start() for t in threads]
    handle = find_device("aud")
    while ray.get(handle.stats.remote())["calls"] < 20:
        time.sleep(0.01)
    before = ray.get(handle.stats.remote())["clients"]["alice-sweep/t1"]["rows"]
    ray.kill(handle, no_restart=False)  # mid-sweep: requests in flight are retried by the clients
    [t.join(120) for t in threads]
    assert answered == {"alice": 60, "bob": 60} and _restarted(handle)
    with pytest.raises(EnvelopeError):
        bob.forward(_x(1, 5.0), THETA)  # refused before the device: logged as refused
    stats = ray.get(handle.stats.remote())
    assert stats["restarts"] == 1
    recs = [r for r in read(audited / "aud.0.jsonl") if "event" not in r]
    ok = [r for r in recs if r["outcome"] == "ok"]
    logged = {who: sum(r["rows"] for r in ok if r["user"] == who) for who in ("alice", "bob")}
    # Every answered request is in the log. A call the kill cut after the device measured it is there
    # too (the device did the work) and its retry as well, so the log may hold a few rows more.
    assert 240 <= logged["alice"] <= 240 + 8 and 240 <= logged["bob"] <= 240 + 8, logged
    assert {r["run"] for r in ok} == {"alice-sweep/t1", "bob-nb"}
    # Accounting did not start again from zero: the restarted actor counts what the log holds.
    assert stats["clients"]["alice-sweep/t1"]["rows"] == logged["alice"] > before
    assert stats["clients"]["bob-nb"]["rows"] == logged["bob"] == stats["users"]["bob"]["rows"]
    refused = [r for r in recs if r["outcome"].startswith("refused")]
    assert len(refused) == 1 and refused[0]["user"] == "bob" and "envelope" in refused[0]["outcome"]
    assert all(r["duration_s"] > 0.005 and len(r["theta"]) == 8 for r in ok)  # the call's 10 ms
    starts = [r for r in read(audited / "aud.0.jsonl") if r.get("event") == "start"]
    assert [s["restarted"] for s in starts] == [False, True]


def test_devices_audit_prints_filters_and_exports(audited, capsys):
    DeviceClient("aud", client_id="carol/x", user="carol").connect().forward(_x(2), THETA)
    assert cli_main(["devices", "audit", "aud", "--user", "carol", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["user"], r["run"], r["rows"], r["outcome"]) for r in rows] == [("carol", "carol/x", "2", "ok")]
    assert cli_main(["devices", "audit", "aud", "--since", "1h", "--format", "json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert {r["user"] for r in recs} >= {"alice", "bob", "carol"} and all("time" in r for r in recs)
    assert cli_main(["devices", "audit", "aud", "--totals", "--format", "json"]) == 0
    totals = json.loads(capsys.readouterr().out)
    assert totals["carol"] == {"requests": 1, "rows": 2, "device_s": pytest.approx(totals["carol"]["device_s"]),
                               "refused": 0, "failed": 0}
    assert totals["bob"]["rows"] >= 240 and totals["bob"]["refused"] == 1
    assert cli_main(["devices", "audit", "aud", "--since", "yesterday-ish"]) == 2
    assert "--since 'yesterday-ish' is not a time" in capsys.readouterr().err
    assert cli_main(["devices", "audit", "nope"]) == 1
    assert "device 'nope' is not up" in capsys.readouterr().err
    assert cli_main(["devices", "ls"]) == 0
    assert "carol" in capsys.readouterr().out  # devices ls shows who is using the device


def test_the_sweep_console_tells_a_restart_and_the_retries_and_accounting_goes_on(ray_session, tmp_path, sqlite_uri):
    from farm.config import parse_config
    from farm.sweep import run_sweep

    cfg = parse_config({
        "devices": [{"name": "aud-kill", "system": {"kind": "oscillators", "n": 16, "latency_call_s": 0.3},
                     "max_restarts": 3, "audit_dir": str(tmp_path / "audit")}],
        "data": {"kind": "digits", "limit": 200},
        "train": {"method": "pat", "device": "aud-kill", "epochs": 3, "batch_size": 32,
                  "encoder": {"kind": "downsample", "size": [4, 4]}},
        "sweep": {"name": "told", "trial_cpus": 1, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"experiment": "told", "user": "dana"},
    })
    seen, done = {}, threading.Event()

    def killer():
        while not done.is_set():
            h = find_device("aud-kill")
            try:
                if h is not None and ray.get(h.stats.remote(), timeout=5)["calls"] >= 3:
                    time.sleep(2.1)  # the console (polling every 2 s) has seen this life
                    ray.kill(h, no_restart=False)
                    seen["killed"] = True
                    return
            except Exception as err:  # noqa: BLE001 - report below
                seen["error"] = repr(err)
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = io.StringIO()
    try:
        outcome = run_sweep(cfg, tracking_uri=sqlite_uri, show=True, stream=out)
    finally:
        done.set()
        t.join(30)
    text = out.getvalue()
    assert seen.get("killed"), seen
    assert outcome.rows[0].metrics["device_retries"] >= 1  # killed mid-training, not after it
    assert [r.status for r in outcome.rows] == ["TERMINATED"], [r.error for r in outcome.rows]
    assert "device 'aud-kill': its actor aud-kill#0 restarted (1 restart so far)" in text, text
    retried = outcome.rows[0].metrics["device_retries"]
    assert retried >= 1 and f"{retried} device requests retried" in text
    # The trial's accounting counts every request the device served for it, across the restart.
    recs = [r for r in read(tmp_path / "audit" / "aud-kill.0.jsonl") if r.get("outcome") == "ok"]
    assert {r["user"] for r in recs} == {"dana"}
    assert outcome.rows[0].metrics["device_requests_total"] == len(recs)
