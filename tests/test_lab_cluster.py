"""A real lab cluster, as people start one: `ray start --head` (token authentication on, as Ray turns
it on when a token exists) and a second raylet, `ray start --address ... --resources '{"device_x": 1}'`
(the PC with the device), each its own process group stopped by its own PID. Everything physfarm
does runs in separate processes with nothing exported beyond Ray's own token file: the CLI brings a
pool up, two people's sweeps and two people's clients share the one device.

And the Ray a local `physfarm sweep` starts: listening on loopback only, measured by PID.
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

from bench.faults import free_port, is_loopback, listening_sockets, process_tree
from conftest import physfarm, user_env as _env

REPO = Path(__file__).resolve().parents[1]


POOL = ("devices:\n  - name: optics\n    system: {kind: oscillators, n: 16, latency_call_s: 0.002}\n"
        "    resources: {device_x: 1}\n")


@pytest.fixture(scope="module")
def pool(lab):
    path = lab["root"] / "pool.yaml"
    path.write_text(POOL)
    up = physfarm("devices", "up", str(path), "--address", lab["address"], env=lab["env"])
    assert up.returncode == 0, up.stderr[-3000:]
    assert "up: optics (oscillators, 1 replica)" in up.stdout
    assert "InvalidAuthToken" not in up.stderr
    yield path
    physfarm("devices", "down", "--address", lab["address"], env=lab["env"])


def _ls(lab) -> list[dict]:
    out = physfarm("devices", "ls", "--address", lab["address"], "--json", env=lab["env"])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_pool_comes_up_on_the_node_with_the_device_with_no_auth_variable_exported(lab, pool):
    rows = _ls(lab)
    assert [(r["device"], r["status"]) for r in rows] == [("optics", "alive")]
    assert rows[0]["node_id"] == lab["device_node"]


def test_an_authentication_failure_says_so_and_how_to_fix_it(lab, tmp_path):
    wrong = lab["env"] | {"RAY_AUTH_TOKEN": "f" * 64}
    out = physfarm("devices", "ls", "--address", lab["address"], env=wrong)
    assert out.returncode == 1
    assert "refused the authentication token from the RAY_AUTH_TOKEN environment variable" in out.stderr
    assert "ray get-auth-token" in out.stderr and "no Ray cluster found" not in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr  # one line, not Ray's retries
    (tmp_path / "empty").mkdir()
    none = _env(tmp_path / "empty")
    out = physfarm("devices", "ls", "--address", lab["address"], env=none)
    assert out.returncode == 1 and "requires token authentication and this PC has no token" in out.stderr
    off = none | {"RAY_AUTH_MODE": "disabled"}
    out = physfarm("devices", "ls", "--address", lab["address"], env=off)
    assert out.returncode == 1 and "RAY_AUTH_MODE=disabled is set" in out.stderr
    out = physfarm("devices", "ls", "--address", f"127.0.0.1:{free_port()}", env=lab["env"])
    assert out.returncode == 1 and "no Ray cluster answers" in out.stderr


def test_auto_never_joins_a_ray_that_ray_start_did_not_record(lab, tmp_path):
    """`--address auto` (the default) is RAY_ADDRESS or the Ray `ray start` recorded here, never any
    Ray found running (Ray's fallback joined another person's Ray without a word)."""
    elsewhere = lab["env"] | {"RAY_TMPDIR": str(tmp_path)}  # where `ray start` records: nothing there
    out = physfarm("devices", "ls", env=elsewhere)
    assert out.returncode == 1 and "no Ray cluster was started with `ray start` on this machine" in out.stderr
    assert f":{lab['address'].rsplit(':', 1)[1]}" in out.stderr and "pick yours with --address" in out.stderr
    out = physfarm("devices", "ls", env=elsewhere | {"RAY_ADDRESS": lab["address"]})
    assert out.returncode == 0, out.stderr[-2000:]


SHARE = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    from farm.client import DeviceClient
    from farm.raycluster import join
    address, client_id, start, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    join(address)
    dev = DeviceClient("optics", client_id=client_id).connect()
    x, theta = np.full((64, 16), 0.1, np.float32), np.zeros(dev.spec.n_params, np.float32)
    rows = [0, 0, 0]   # per sending thread
    time.sleep(max(0.0, start - time.time()))   # both people start together
    def send(i):
        while time.time() < start + seconds:
            rows[i] += dev.forward(x, theta).shape[0]
    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]   # 3 requests in flight
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(sum(rows))
""")


def test_two_people_in_two_processes_share_the_device_fairly_and_are_accounted(lab, pool):
    start = time.time() + 15  # after both processes joined
    procs = {who: subprocess.Popen([sys.executable, "-c", SHARE, lab["address"], f"{who}/notebook", str(start), "4"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=lab["env"], cwd=REPO)
             for who in ("alice", "bob")}
    got = {}
    for who, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        got[who] = int(out.split()[-1])
    clients = _ls(lab)[0]["clients"]
    for who, rows in got.items():
        assert clients[f"{who}/notebook"]["rows"] == rows  # the device counted what each received
    share = got["alice"] / (got["alice"] + got["bob"])
    assert 0.4 <= share <= 0.6, got  # round-robin between the two, both always waiting


def test_two_sweeps_of_two_people_share_the_device(lab, pool, tmp_path):
    procs = {}
    for who in ("alice", "bob"):
        raw = {
            "devices": [{"name": "optics", "system": {"kind": "oscillators", "n": 16},
                         "resources": {"device_x": 1}}],
            "data": {"kind": "digits", "limit": 120},
            "train": {"method": "pat", "device": "optics", "epochs": 1, "batch_size": 32,
                      "encoder": {"kind": "downsample", "size": [4, 4]}},
            "sweep": {"name": f"{who}-sweep", "trial_cpus": 1, "storage_path": str(tmp_path / who)},
            "tracking": {"uri": f"sqlite:///{tmp_path / who}.db", "experiment": f"{who}-sweep"},
        }
        path = tmp_path / f"{who}.yaml"
        path.write_text(yaml.safe_dump(raw))
        procs[who] = subprocess.Popen(
            [sys.executable, "-m", "farm.cli", "sweep", str(path), "--address", lab["address"], "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=lab["env"] | {"PHYSFARM_USER": who},
            cwd=tmp_path)
    outs = {}
    for who, proc in procs.items():
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, (out[-2000:], err[-3000:])
        outs[who] = out
    for out in outs.values():
        line = next(ln for ln in out.splitlines() if ln.startswith("Ray: "))
        assert "(joined)" in line and "physfarm devices ls --address " in line
    row = _ls(lab)[0]
    clients = row["clients"]
    for who in ("alice", "bob"):
        served = [c for c in clients if c.startswith(f"{who}-sweep/")]
        assert served and all(clients[c]["rows"] > 0 and clients[c]["user"] == who for c in served), clients
        assert row["users"][who]["rows"] == sum(clients[c]["rows"] for c in served)
        # The MLflow runs name the person too.
        from mlflow.tracking import MlflowClient

        store = MlflowClient(f"sqlite:///{tmp_path / who}.db")
        exp = store.get_experiment_by_name(f"{who}-sweep")
        assert {r.data.tags["mlflow.user"] for r in store.search_runs([exp.experiment_id])} == {who}
    table = physfarm("devices", "ls", "--address", lab["address"], env=lab["env"]).stdout
    assert "USERS" in table and "alice" in table and "bob" in table


ONE = textwrap.dedent("""
    import sys
    import numpy as np
    from farm.client import DeviceClient
    from farm.raycluster import join
    join(sys.argv[1])
    dev = DeviceClient("optics", client_id=sys.argv[2] + "/notebook").connect()   # the user: $PHYSFARM_USER
    try:
        print(dev.forward(np.zeros((2, 16), np.float32), np.zeros(dev.spec.n_params, np.float32)).shape[0])
    except Exception as err:
        print("refused:", str(err).splitlines()[-1])
""")


def test_a_lease_and_a_reservation_from_the_cli_hold_across_processes(lab, pool):
    alice, bob = lab["env"] | {"PHYSFARM_USER": "alice"}, lab["env"] | {"PHYSFARM_USER": "bob"}

    def request(env, who):
        out = subprocess.run([sys.executable, "-c", ONE, lab["address"], who], capture_output=True, text=True,
                             env=env, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip()

    took = physfarm("devices", "lease", "optics", "--for", "10m", "--address", lab["address"], env=alice)
    assert took.returncode == 0 and "leased: optics to alice" in took.stdout, took.stderr
    try:
        assert request(alice, "alice") == "2"
        assert request(bob, "bob").startswith("refused:") and "reserved by 'alice'" in request(bob, "bob")
    finally:
        gave = physfarm("devices", "release", "optics", "--address", lab["address"], env=alice)
        assert gave.returncode == 0, gave.stderr
    assert request(bob, "bob") == "2"
    booked = physfarm("devices", "reserve", "optics", "--from", "now", "--to", "+10m", "--address", lab["address"],
                      env=bob)
    assert booked.returncode == 0, booked.stderr
    rid = booked.stdout.split("(id ")[1].split(")")[0]
    try:
        assert request(bob, "bob") == "2" and "reserved for bob" in request(alice, "alice")
        listed = physfarm("devices", "reservations", "--address", lab["address"], env=alice).stdout
        assert "optics" in listed and "bob" in listed and rid in listed
    finally:
        physfarm("devices", "unreserve", "optics", rid, "--address", lab["address"], env=bob)
    assert request(alice, "alice") == "2"


# -- the Ray a local sweep starts ---------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys
    import ray
    from farm.sweep import init_ray
    address = init_ray(None, lan=sys.argv[1] == "lan")   # what `physfarm sweep [--lan]` does
    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self):
            return 1
    probe = Probe.remote()
    ray.get(probe.ping.remote())                       # a worker process too
    print(address, flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("lan", [False, True])
def test_local_ray_listens_on_loopback_only_unless_lan(tmp_path, lan):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, "lan" if lan else "local"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path), cwd=REPO)
    try:
        address = proc.stdout.readline().strip()
        assert address, proc.stderr.read()[-3000:] if proc.poll() is not None else "no address"
        sockets = listening_sockets(process_tree(proc.pid))
        assert len({pid for *_, pid in sockets}) >= 3  # the driver, GCS, raylet, the worker...
        outside = {(ip, port) for ip, port, _ in sockets if not is_loopback(ip)}
        if lan:
            assert outside, sockets  # the measure sees a socket on another address when there is one
        else:
            assert not outside, f"listening beyond loopback: {sorted(outside)}"
            assert address.startswith("127.0.0.1:")
            # Another shell of the same person attaches with the address the sweep prints.
            ls = physfarm("devices", "ls", "--address", address, env=_env(tmp_path))
            assert ls.returncode == 0 and "no devices are up" in ls.stdout, ls.stderr[-2000:]
    finally:
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
