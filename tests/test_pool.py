"""The device pool as a shared service, on a real Ray: replicas, fairness, backpressure, leases,
health under load, retries across actor restarts, accounting, and the `physfarm devices` CLI."""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from ray import cloudpickle

from actors.errors import DeviceBusyError, DeviceError, DeviceLeasedError, DeviceTimeoutError, EnvelopeError
from farm.cli import main as cli_main
from farm.client import DeviceClient
from farm.config import DeviceConfig, parse_config
from farm.errors import ConfigError
from farm.pool import find_device, load_pool, pool_status, running_devices, start_device, stop_device

REPO = Path(__file__).resolve().parents[1]
N = 4  # oscillators: x[B, 4], theta[20]
THETA = np.zeros(N * N + N, np.float32)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the holder actor below runs on workers


def _x(rows: int, value: float = 0.1) -> np.ndarray:
    return np.full((rows, N), value, np.float32)


def _restarted(handle, wait_s: float = 60.0) -> bool:
    """Whether the actor comes back as a restarted incarnation within wait_s (ray.kill is async)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if ray.get(handle.info.remote(), timeout=10)["restarted"]:
                return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    return False


def _gone(handle) -> bool:
    try:
        ray.get(handle.ping.remote(), timeout=10)
        return False
    except ray.exceptions.RayActorError:
        return True


def _process_gone(pid: int) -> bool:
    """Whether process `pid` (on this machine) has exited; a zombie awaiting its parent counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_until(condition, what: str, timeout_s: float = 60.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.005)


def _arrived_rows(handle, call_rows: int) -> int:
    """Rows the actor has received: queued, served, or in the device call in progress (taken as
    `call_rows`; a batch taken from the queue but not yet in its call is missed, so poll)."""
    stats = ray.get(handle.stats.remote())
    return stats["queued_rows"] + stats["rows"] + (call_rows if stats["in_call"] else 0)


def _osc(**system) -> dict:
    return {"kind": "oscillators", "n": N, "seed": 0, **system}


@pytest.fixture
def device(ray_session):
    """start(name, **DeviceConfig fields) -> handles; every device started is stopped afterwards."""
    started = {}  # keeps the handles: a non-detached actor dies with its last handle

    def start(name: str, system: dict | None = None, **fields):
        started[name] = start_device(DeviceConfig(name=name, system=system or _osc(), **fields))
        return started[name]

    yield start
    for name in started:
        stop_device(name)


# -- pool files -------------------------------------------------------------------------------------
def test_pool_file_is_the_devices_list_of_a_sweep_config(tmp_path):
    pool = load_pool(REPO / "examples" / "pool.yaml")
    assert [d.name for d in pool.devices] == ["osc"] and pool.devices[0].replicas == 2
    bad = tmp_path / "pool.yaml"
    bad.write_text("devices:\n  - name: a\n    system: {kind: oscillators}\n    lease_policy: never\n")
    with pytest.raises(ConfigError, match=r"devices\[0\]\.lease_policy: .*'refuse' or 'wait'.*never"):
        load_pool(bad)
    bad.write_text("devices:\n  - name: a\n    system: {kind: oscilators}\n")
    with pytest.raises(ConfigError, match=r"devices\[0\]\.system\.kind: unknown system kind 'oscilators'"):
        load_pool(bad)


# -- replicas and accounting ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rep(ray_session):
    """A quick device with two replicas (shared by the replica and lease tests)."""
    handles = start_device(DeviceConfig(name="rep", system=_osc(latency_call_s=0.02, max_rows=8), replicas=2))
    yield handles
    stop_device("rep")


@pytest.fixture(scope="module")
def slow(ray_session):
    """A slow device (0.5 s per call, 4 rows per call) with two replicas that may restart."""
    handles = start_device(DeviceConfig(name="slow", system=_osc(latency_call_s=0.5, max_rows=4),
                                        replicas=2, max_restarts=2))
    yield handles
    stop_device("slow")


def test_replicas_share_the_load_and_accounting_sums_over_them(rep):
    assert sorted(running_devices()["rep"]) == [0, 1]
    clients = [DeviceClient("rep", client_id=f"c{i}").connect() for i in range(4)]

    def work(c):
        for _ in range(8):
            assert c.forward(_x(3), THETA).shape == (3, N)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    [t.start() for t in threads]
    [t.join() for t in threads]
    per = [ray.get(h.stats.remote()) for h in rep]
    assert all(p["requests"] >= 6 for p in per), [p["requests"] for p in per]  # both replicas served
    for c in clients:  # each client's rows, summed over the replicas that served it
        assert c.client_stats()["rows"] == 24 and c.client_stats()["requests"] == 8
    total = clients[0].stats()
    assert total["rows"] == 96 and len(total["replicas"]) == 2 and total["clients"]["c0"]["rows"] == 24


def test_client_sends_to_the_least_loaded_replica(slow):
    busy = [slow[0].forward.remote(_x(4), THETA, "hog") for _ in range(3)]  # replica 0: a queue
    while ray.get(slow[0].stats.remote())["queued_rows"] < 8:
        time.sleep(0.02)
    c = DeviceClient("slow", client_id="newcomer").connect()  # sees the replicas' queues
    c.forward(_x(2), THETA)
    served = [ray.get(h.stats.remote())["clients"].get("newcomer", {}).get("rows", 0) for h in slow]
    assert served == [0, 2]
    ray.get(busy)


# -- health, fairness, backpressure -----------------------------------------------------------------
def test_stats_and_ping_answer_while_a_slow_device_call_runs(slow):
    h = slow[1]
    refs = [h.forward.remote(_x(4), THETA, "slowpoke") for _ in range(3)]  # 1.5 s of device work
    while not ray.get(h.stats.remote())["in_call"]:
        time.sleep(0.01)
    times = []
    for method in ("stats", "ping", "load", "lease_info", "info", "stats"):
        t0 = time.perf_counter()
        ray.get(getattr(h, method).remote(), timeout=5)
        times.append(time.perf_counter() - t0)
    stats = ray.get(h.stats.remote())
    assert stats["in_call"] and stats["queued_requests"] >= 1  # all answered while the device worked
    assert statistics.median(times) < 0.1 and max(times) < 0.4, times
    assert [y.shape for y in ray.get(refs)] == [(4, N)] * 3


def test_a_heavy_client_cannot_starve_a_light_one(device):
    (h,) = device("fair", _osc(latency_call_s=0.03, max_rows=32))
    heavy = [h.forward.remote(_x(480), THETA, "heavy") for _ in range(3)]  # 45 full calls queued
    # Until all three have arrived: the light client must meet them queued (a device call takes 32 rows).
    _wait_until(lambda: _arrived_rows(h, 32) >= 3 * 480, what="the heavy client's requests to arrive")
    light = DeviceClient("fair", client_id="light").connect()
    lat = []
    for _ in range(5):
        t0 = time.perf_counter()
        light.forward(_x(2), THETA)
        lat.append(time.perf_counter() - t0)
    stats = ray.get(h.stats.remote())
    assert stats["queued_rows"] > 0  # the heavy client still had work queued: demand > capacity
    mine = stats["clients"]["light"]
    # Waits at most about one call (0.03 s) per request, not behind the heavy client's 45 calls.
    assert mine["wait_s"] / mine["requests"] < 0.1, mine
    assert statistics.median(lat) < 0.25, lat
    ray.get(heavy)


def test_a_full_queue_refuses_with_the_device_and_its_limit(device):
    (h,) = device("bp", _osc(latency_call_s=0.4, max_rows=8), max_queue_rows=16)
    first = h.forward.remote(_x(8), THETA, "a")  # taken into the device call at once
    while not ray.get(h.stats.remote())["in_call"]:
        time.sleep(0.01)
    queued = [h.forward.remote(_x(8), THETA, "a") for _ in range(2)]  # 16 rows wait: the limit
    while ray.get(h.stats.remote())["queued_rows"] < 16:
        time.sleep(0.01)
    c = DeviceClient("bp", client_id="b", retries=0).connect()
    with pytest.raises(DeviceBusyError, match=r"device 'bp' \(bp#0\): queue full .*max_queue_rows=16.*add replicas"):
        c.forward(_x(4), THETA)
    with pytest.raises(DeviceBusyError, match="a request of 40 rows can never fit"):
        c.forward(_x(40), THETA)
    ray.get([first, *queued])
    assert c.forward(_x(4), THETA).shape == (4, N)  # the queue drained: served again


# -- leases -----------------------------------------------------------------------------------------
def test_lease_is_exclusive_cannot_be_taken_over_and_ends_on_release(rep):
    alice = DeviceClient("rep", client_id="alice").connect()
    bob = DeviceClient("rep", client_id="bob").connect()
    lease = alice.lease(60, heartbeat_s=5)
    try:
        with pytest.raises(DeviceLeasedError, match=r"device 'rep' \(rep#\d\) is reserved by 'alice' until \d{4}-"):
            bob.forward(_x(2), THETA)
        with pytest.raises(DeviceLeasedError, match="reserved by 'alice'"):
            bob.lease(10)
        assert alice.forward(_x(2), THETA).shape == (2, N)
        assert DeviceClient("rep", client_id="alice/trial_1").connect().forward(_x(1), THETA).shape == (1, N)
        with pytest.raises(DeviceLeasedError, match="only its holder can release it"):
            ray.get(rep[1].release_lease.remote("not-the-token"))
        assert bob.lease_info()["holder"] == "alice"
    finally:
        lease.release()
    assert bob.lease_info() is None and bob.forward(_x(2), THETA).shape == (2, N)


@ray.remote(num_cpus=0)
class Holder:
    """A lease holder in its own process (like a trial or a driver)."""

    def take(self, device: str, heartbeat_s: float) -> str:
        self.client = DeviceClient(device, client_id="holder").connect()
        self.lease = self.client.lease(3600, heartbeat_s=heartbeat_s)
        return self.lease.token


def test_a_lease_lapses_when_its_holder_dies(rep):
    holder = Holder.remote()
    ray.get(holder.take.remote("rep", 1.0))
    other = DeviceClient("rep", client_id="other").connect()
    time.sleep(1.2)  # heartbeats keep the lease past heartbeat_s while the holder lives
    assert other.lease_info()["holder"] == "holder"
    ray.kill(holder, no_restart=True)
    deadline = time.monotonic() + 5
    while other.lease_info() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert other.lease_info() is None
    assert other.forward(_x(2), THETA).shape == (2, N)


def test_wait_policy_holds_others_until_the_lease_ends(device):
    device("queue", _osc(), lease_policy="wait")
    owner = DeviceClient("queue", client_id="owner").connect()
    lease = owner.lease(0.8, heartbeat_s=5)
    other = DeviceClient("queue", client_id="other").connect()
    assert other.forward(_x(2), THETA).shape == (2, N)  # waited, then served
    assert time.time() >= lease.until - 0.05  # not before the lease ended
    assert not lease.active
    stats = ray.get(find_device("queue").stats.remote())
    assert stats["refused"] == 0 and stats["clients"]["other"]["wait_s"] > 0.2


# -- faults -------------------------------------------------------------------------------------------
def test_faults_are_retried_envelope_errors_never_and_a_dead_device_is_named(device):
    (h,) = device("flaky", _osc(fault_rate=0.5))
    c = DeviceClient("flaky", client_id="t", retries=10, backoff_s=0.01).connect()
    for _ in range(6):
        assert c.forward(_x(2), THETA).shape == (2, N)
    assert ray.get(h.stats.remote())["errors"] >= 1 and c.retried >= 1
    refused = ray.get(h.stats.remote())["refused"]
    with pytest.raises(EnvelopeError):
        c.forward(_x(2, np.nan), THETA)
    assert ray.get(h.stats.remote())["refused"] == refused + 1  # sent once, not retried
    once = DeviceClient("flaky", client_id="t", retries=0).connect()
    with pytest.raises(DeviceError, match=r"device 'flaky#0'.*fault.*\[forward failed after 1 attempt"):
        for _ in range(20):
            once.forward(_x(2), THETA)
    pid = ray.get(h.info.remote())["pid"]
    ray.kill(h, no_restart=True)  # gone for good: fail at once, naming the device
    # ray.kill is asynchronous: Ray may call the actor dead while its process, still exiting, answers on
    # its local channel (milliseconds, more under load). The device is gone once both are.
    _wait_until(lambda: _gone(h), "the killed actor to be gone")
    _wait_until(lambda: _process_gone(pid), f"the killed actor's process {pid} to exit")
    with pytest.raises(DeviceError, match=r"device 'flaky' \(flaky#0\) is unavailable for forward .*actor is gone"):
        c.forward(_x(2), THETA)


def test_timeouts_fail_the_request_without_retry(slow):
    c = DeviceClient("slow", client_id="impatient", retries=3, timeout_s=0.2).connect()
    with pytest.raises(DeviceTimeoutError, match=r"device 'slow' \(slow#\d\): no answer to forward within 0.2 s"):
        c.forward(_x(2), THETA)
    assert c.retried == 0


def test_a_killed_actor_restarts_and_the_request_is_retried(slow):
    c = DeviceClient("slow", client_id="survivor", retries=3, backoff_s=0.1).connect()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("y", c.forward(_x(2), THETA)))
    t.start()
    victim = None
    while victim is None:
        victim = next((h for h in slow if ray.get(h.stats.remote())["clients"].get("survivor")), None)
        time.sleep(0.01)
    ray.kill(victim, no_restart=False)  # mid-request
    t.join(30)
    assert out["y"].shape == (2, N) and c.retried >= 1
    assert _restarted(victim)


def test_sweep_goes_on_when_its_device_actor_is_killed(ray_session, tmp_path, sqlite_uri):
    from farm.sweep import run_sweep

    cfg = parse_config({
        "devices": [{"name": "osc-kill", "system": _osc(n=16, latency_call_s=0.02), "max_restarts": 3}],
        "data": {"kind": "digits", "limit": 200},
        "train": {"method": "pat", "device": "osc-kill", "epochs": 1, "batch_size": 32,
                  "encoder": {"kind": "downsample", "size": [4, 4]},  # 64 digit pixels -> 16 inputs
                  "seed": {"grid": [0, 1]}},
        "sweep": {"name": "killed", "trial_cpus": 1, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"experiment": "killed"},
    })
    seen, done = {}, threading.Event()

    def killer():
        while not done.is_set():
            h = find_device("osc-kill")
            try:
                if h is not None and ray.get(h.stats.remote(), timeout=5)["calls"] >= 3:
                    ray.kill(h, no_restart=False)
                    seen["killed"] = True
                    break
            except Exception as err:  # noqa: BLE001 - report below
                seen["error"] = repr(err)
            time.sleep(0.02)
        if seen.get("killed"):
            seen["restarted"] = _restarted(h)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        outcome = run_sweep(cfg, tracking_uri=sqlite_uri)
    finally:
        done.set()
        t.join(30)
    assert seen.get("killed") and seen.get("restarted"), seen
    assert [r.status for r in outcome.rows] == ["TERMINATED", "TERMINATED"], [r.error for r in outcome.rows]
    assert all(r.metrics["device_s_total"] >= 0 and "device_requests_total" in r.metrics for r in outcome.rows)
    assert find_device("osc-kill") is None  # the sweep stopped the device it started


# -- the CLI --------------------------------------------------------------------------------------------
def test_devices_up_ls_down(ray_session, tmp_path, capsys):
    pool = tmp_path / "pool.yaml"
    pool.write_text("devices:\n  - name: cli-osc\n    system: {kind: oscillators, n: 4}\n")
    assert cli_main(["devices", "up", str(pool)]) == 0
    assert "up: cli-osc (oscillators, 1 replica): cli-osc#0 on" in capsys.readouterr().out
    DeviceClient("cli-osc", client_id="someone").connect().forward(_x(3), THETA)
    rows = {r["actor"]: r for r in pool_status()}
    assert "cli-osc#0" in rows
    assert all(r["status"] == "alive" and r["node"] for r in rows.values() if r["device"] == "cli-osc")
    assert sum(r["rows"] for r in rows.values() if r["device"] == "cli-osc") == 3
    assert cli_main(["devices", "ls"]) == 0
    out = capsys.readouterr().out
    assert "DEVICE" in out and "LEASE" in out and re.search(r"cli-osc\s+0\s+\S+\s+alive", out)
    assert cli_main(["devices", "down", "cli-osc"]) == 0
    assert "down: cli-osc (1 replica)" in capsys.readouterr().out
    assert "cli-osc" not in running_devices()
    assert cli_main(["devices", "down", "cli-osc"]) == 1
    assert "device 'cli-osc' is not up" in capsys.readouterr().err


def test_devices_ls_without_a_cluster_says_how_to_start_one():
    proc = subprocess.run([sys.executable, "-m", "farm.cli", "devices", "ls", "--address", "127.0.0.1:9"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 1
    assert "no Ray cluster answers at --address 127.0.0.1:9" in proc.stderr and "ray start --head" in proc.stderr
