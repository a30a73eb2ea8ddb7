"""Shared fixtures: a real Ray per test module, a real MLflow SQLite store per test, a real lab cluster
(`ray start` processes) per test module that asks for one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import settings

# CI replays one fixed set of generated cases (the property tests' examples are derived from the test,
# not drawn anew), so a red CI always names a case that reproduces; locally each run explores afresh.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Device actors append every call to an audit log (actors/audit.py); the tests' go to a folder of
# their own, not to ~/.physfarm/audit (the actors' processes inherit this variable).
os.environ.setdefault("PHYSFARM_AUDIT_DIR", tempfile.mkdtemp(prefix="physfarm-audit-"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
VOWELS_CSV = SHARED_DATA / "vowels_hillenbrand_women.csv"

# Recorded devices keep their fits on disk; the suite keeps its own, empty at the start of every run
# (set before any Ray starts, so device actors and trial workers inherit it).
if "PHYSFARM_TEST_KEEP_CACHE" not in os.environ:
    import tempfile

    os.environ["PHYSFARM_CACHE_DIR"] = tempfile.mkdtemp(prefix="physfarm-test-cache-")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    small tensors run fastest so, and a busy 2-core machine makes a pool of two threads crawl."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_session():
    """A real local Ray for the whole module (2 CPUs, no dashboard), shut down afterwards."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="physfarm", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def vowels_csv() -> Path:
    if not VOWELS_CSV.exists():
        pytest.skip(f"vowel data not found at {VOWELS_CSV} (it lives in ../shared/data beside the checkout)")
    return VOWELS_CSV


@pytest.fixture
def serve():
    """serve(config, **kw) -> (server, port): a real instrument server (actors/instrument/server.py)
    in a thread on a free loopback port; stopped after the test."""
    from actors.instrument.server import InstrumentServer

    servers = []

    def _serve(config, **kw):
        server = InstrumentServer(config, port=kw.pop("port", 0), log=lambda msg: None, **kw)
        _, port = server.start()
        servers.append(server)
        return server, port

    yield _serve
    for s in servers:
        s.stop()


@pytest.fixture
def fault_proxy():
    """fault_proxy(port) -> FaultProxy: a loopback proxy in front of a server that can hang or drop
    its connections on demand (bench/faults.py); closed after the test."""
    from bench.faults import FaultProxy

    proxies = []

    def _proxy(port: int) -> FaultProxy:
        proxies.append(FaultProxy(("127.0.0.1", port)).start())
        return proxies[-1]

    yield _proxy
    for p in proxies:
        p.close()


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri(monkeypatch):
    """Each test starts without MLFLOW_TRACKING_URI: a value left by the caller's shell (or by an
    earlier test's mlflow.set_tracking_uri) would send a sweep's writes to another store, since the
    variable outranks the config's tracking.uri. Tests of that precedence set it themselves."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# -- a real lab cluster ------------------------------------------------------------------------------
RAY_CLI = str(Path(sys.executable).parent / "ray")
LAB_TOKEN = "0123456789abcdef" * 4


def user_env(home: Path, **extra) -> dict:
    """A user's shell: no RAY_* or PHYSFARM_* variables (nothing exported for physfarm), this HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PHYSFARM_"))}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), **extra)
    return env


class RayNode:
    """One `ray start ... --block` process in a process group of its own (its GCS, raylet and workers
    with it): stopped by killing that group only, never `ray stop` (other Rays run here)."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self.proc = subprocess.Popen([RAY_CLI, "start", *args, "--block", "--disable-usage-stats"], env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        # The head's `ray start --block` leaves its GCS and workers running well past a SIGTERM (20 s
        # and more): it gets a few seconds, then the group is killed (a test cluster keeps nothing).
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the leader once it exits: its zombie would keep the group alive
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.2)


def physfarm(*args, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "farm.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


def store_count(db: Path, sql: str) -> int:
    """A count read from a sweep's MLflow SQLite file while the sweep writes it (read-only); 0 while
    the file is not created yet or busy."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute(sql).fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def wait_while_running(proc: subprocess.Popen, ready, deadline: float, what: str) -> None:
    """Poll `ready()` until true; fail with the process's stderr if it ends first, or naming `what`
    once the monotonic `deadline` passes."""
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{what} in time"
        time.sleep(0.2)


def sweep_signalled_when(path: Path, cwd: Path, ready, sig: int, what: str, wait_s: float = 240) -> tuple:
    """`physfarm sweep PATH --quiet` as a subprocess, sent `sig` once `ready()` is true, waited for.
    Returns (the ended process, its stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "farm.cli", "sweep", str(path), "--quiet"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_while_running(proc, ready, time.monotonic() + wait_s, what)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err


_NODES = textwrap.dedent("""
    import json, sys
    import ray
    from farm.raycluster import join
    join(sys.argv[1])
    print(json.dumps([{"id": n["NodeID"], "device_x": n["Resources"].get("device_x", 0)}
                      for n in ray.nodes() if n["Alive"]]))
""")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A real lab cluster for a test module, as people start one: `ray start --head` (token
    authentication on, as Ray turns it on when a token exists) and a second raylet, `ray start --address
    ... --resources '{"device_x": 1}'` (the PC with the device), each its own process group stopped by
    its own PID. physfarm runs beside it in processes of their own, with `user_env(lab["home"])` (here
    `lab["env"]`). (tests/test_pool_cluster.py has a `lab` of its own: a cluster in the test process.)"""
    from bench.faults import free_port

    root = tmp_path_factory.mktemp("lab")
    home = root / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(LAB_TOKEN)  # the documented place of a Ray token
    port = free_port()
    address = f"127.0.0.1:{port}"
    # The head: Ray turns token authentication on by itself since a token exists (no RAY_AUTH_MODE).
    head = RayNode(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                    "--include-dashboard", "false", "--temp-dir", str(root / "ray")], user_env(home), root / "head.log")
    nodes = [head]
    try:
        env = user_env(home)
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in head.log.read_text():
            assert head.proc.poll() is None and time.monotonic() < deadline, head.log.read_text()[-3000:]
            time.sleep(0.3)
        assert "Token authentication is enabled" in head.log.read_text()
        # The PC with the device joins as Ray documents it for a token cluster (RAY_AUTH_MODE=token).
        worker = RayNode(["--address", address, "--num-cpus", "0", "--resources", '{"device_x": 1}'],
                         user_env(home, RAY_AUTH_MODE="token"), root / "worker.log")
        nodes.append(worker)
        while True:
            out = subprocess.run([sys.executable, "-c", _NODES, address], capture_output=True, text=True,
                                 env=env, cwd=REPO, timeout=120)
            assert out.returncode == 0, out.stderr[-3000:]
            listed = json.loads(out.stdout)
            if len(listed) == 2:
                break
            assert worker.proc.poll() is None and time.monotonic() < deadline, worker.log.read_text()[-3000:]
            time.sleep(0.5)
        device_node = next(n["id"] for n in listed if n["device_x"])
        yield {"address": address, "home": home, "root": root, "env": env, "device_node": device_node}
    finally:
        for node in reversed(nodes):
            node.stop()
