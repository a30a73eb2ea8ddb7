"""Shared fixtures: a real Ray per test module, a real MLflow SQLite store per test."""
from __future__ import annotations

import os
import tempfile
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
