"""The Ray that physfarm runs on: join a cluster someone started, or start a private local one.

Joining (`join`). Ray 2.60 turns token authentication on in a client by itself only when it finds a
cluster on its own (address "auto"); with an explicit address (`--address HOST:PORT`, `RAY_ADDRESS`)
it sends no token, and a cluster started with `ray start --head` while a token exists (Ray's default
since `ray.init` writes one to ~/.ray/auth_token) then refuses it with `InvalidAuthToken` until
`ray.init` gives up with "Failed to connect". So `join` asks the cluster first, with one GCS call:
  - accepted without a token: the cluster has authentication off; join as is;
  - refused: if `RAY_AUTH_MODE` is not set and a token is where Ray looks for one (`RAY_AUTH_TOKEN`,
    the file `RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`), switch this process to token mode (what Ray
    does for "auto") and ask again; a refusal then, or no token at all, is `ClusterAuthError`, whose
    message says which token was tried and how to get the cluster's.
The token is sent only to a cluster that demands one. A cluster with authentication off is never
switched to token mode: a token-mode driver on it can run tasks but its actors fail to register.

"auto" means `RAY_ADDRESS`, else the cluster `ray start` recorded on this machine; never "whatever
Ray runs here" (Ray's fallback), which joined another person's Ray without a word.

Starting (`start_local`): a Ray for this process only. Ray picks the machine's network address as
the node address and binds its GCS, raylets and workers on every interface; with Ray's
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (the single-machine mode it uses on laptops) the node address
is 127.0.0.1 and every socket listens on loopback only (tests/test_lab_cluster.py measures it).
`lan=True` keeps Ray's own choice, for a Ray that lab PCs join. Token authentication stays on (Ray's
default for a Ray it starts).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from pathlib import Path

from .errors import ConfigError

NAMESPACE = "physfarm"  # farm.pool's too (not imported: this module must load fast, before torch)
AUTH_MODE = "RAY_AUTH_MODE"
GCS_ANSWER_S = 10.0  # a GCS answers GetClusterId in milliseconds; an open port silent this long is not one
_LOOPBACK_MODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

HOW_TO_START = (
    "start one first: `ray start --head --port=6379` on this machine (lab PCs join with "
    "`RAY_AUTH_MODE=token ray start --address=HEAD_IP:6379 --resources='{\"optics_table\": 1}'`, or "
    "`ray up cluster.yaml`; see docs/pool.md), or pass --address HOST:PORT of a running cluster"
)


class NoCluster(ConnectionError):
    """Nothing (or nothing Ray) answers at the address."""


class ClusterAuthError(NoCluster):
    """A cluster answers but refuses this process (token authentication)."""


# -- joining ---------------------------------------------------------------------------------------
def join(address: str | None = "auto") -> str:
    """Join the running Ray cluster at `address` ("auto": see the module doc) in the physfarm
    namespace; never starts one. Returns the cluster's address (HOST:PORT)."""
    import ray

    if ray.is_initialized():
        return current_address()
    target = resolve(address)
    if not target.startswith("ray://"):
        _probe_tcp(target)
        if _loopback_only(target):
            _loopback_mode()
        check_auth(target)
    try:
        ray.init(address=target, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as err:
        raise NoCluster(f"no Ray cluster found at --address {target} ({str(err).splitlines()[0]}); "
                        f"{HOW_TO_START}") from None
    return current_address()


def resolve(address: str | None) -> str:
    """HOST:PORT (or ray://...) for `address`; "auto"/None: RAY_ADDRESS, else the cluster that
    `ray start` recorded on this machine. NoCluster when there is none."""
    if address not in (None, "", "auto"):
        return address
    env = os.environ.get("RAY_ADDRESS")
    if env == "local":
        raise NoCluster("RAY_ADDRESS=local asks for a new Ray, but this command joins a running cluster; "
                        "unset RAY_ADDRESS or pass --address HOST:PORT")
    if env:
        return env
    from ray._private import services

    recorded = services.find_bootstrap_address(None)
    running = set(services.find_gcs_addresses())
    if recorded and recorded in running:
        return recorded
    others = (f" (Rays running here that `ray start` did not record, perhaps other people's: "
              f"{', '.join(sorted(running))}; pick yours with --address)") if running else ""
    raise NoCluster(f"no Ray cluster was started with `ray start` on this machine{others}; {HOW_TO_START}")


def _probe_tcp(address: str) -> None:
    """A quick TCP check of HOST:PORT (ray.init would otherwise retry for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3.0).close()
    except OSError as err:
        raise NoCluster(f"no Ray cluster answers at --address {address} ({err.strerror or err}); "
                        f"{HOW_TO_START}") from None


def _loopback_only(address: str) -> bool:
    """Whether `address` is a loopback one of a Ray that listens on loopback only (a sweep's own).
    Ray rewrites a loopback address into the machine's network address before it connects, which
    finds nothing there; this process must then stay on loopback too."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not _is_loopback(host):
        return False
    from ray._private import services

    lan = services.get_node_ip_address()
    if _is_loopback(lan):
        return False
    try:
        socket.create_connection((lan, int(port)), timeout=2.0).close()
    except OSError:
        return True
    return False


def _is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_source() -> str | None:
    """Where this process would read a Ray token from (Ray's order), or None when it has none."""
    from ray._raylet import AuthenticationTokenLoader

    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    return str(Path.home() / ".ray" / "auth_token")


_FIX = ("get the cluster's token (on the head PC, `ray get-auth-token` prints it) and put it in "
        "~/.ray/auth_token on this PC, or give it as RAY_AUTH_TOKEN=... or RAY_AUTH_TOKEN_PATH=FILE "
        "(Ray's token authentication, https://docs.ray.io/en/latest/ray-security/token-auth.html)")


def check_auth(address: str) -> None:
    """Make this process's token mode fit the cluster at `address` (see the module doc), or raise
    ClusterAuthError saying why it is refused and what to do."""
    if _gcs_accepts(address):
        return
    mode = os.environ.get(AUTH_MODE)
    source = token_source()
    if mode is None and source is not None:
        _enable_token_mode()
        if _gcs_accepts(address):
            return
        raise ClusterAuthError(
            f"the Ray cluster at {address} refused the authentication token from {source} "
            f"(InvalidAuthToken: it is not this cluster's token); {_FIX}")
    if mode is not None and mode.lower() != "token":
        raise ClusterAuthError(
            f"the Ray cluster at {address} requires token authentication, but {AUTH_MODE}={mode} is set "
            f"in this environment; unset it (physfarm then uses the token Ray finds), and if this PC "
            f"has no token: {_FIX}")
    if source is None:
        raise ClusterAuthError(
            f"the Ray cluster at {address} requires token authentication and this PC has no token; {_FIX}")
    raise ClusterAuthError(
        f"the Ray cluster at {address} refused the authentication token from {source} "
        f"(InvalidAuthToken: it is not this cluster's token); {_FIX}")


def _enable_token_mode() -> None:
    """Token mode for this process and the processes it starts (as Ray does for address "auto")."""
    from ray._raylet import Config

    os.environ[AUTH_MODE] = "token"
    Config.initialize("")  # Ray reads the mode from its cached config: refresh it


def _gcs_accepts(address: str) -> bool:
    """Whether the GCS at `address` answers this process (True) or refuses its authentication
    (False). The call runs in a thread so that a port that is open but not Ray's fails in
    GCS_ANSWER_S instead of Ray's 40 s; Ray's own log lines of the attempt are kept off the terminal."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    outcome: dict = {}

    def ask() -> None:
        try:
            GcsClient(address=address)
            outcome["ok"] = True
        except AuthenticationError:
            outcome["ok"] = False
        except Exception as err:  # noqa: BLE001 - handed to the caller
            outcome["error"] = err

    with _quiet_stderr():
        worker = threading.Thread(target=ask, daemon=True)
        worker.start()
        worker.join(GCS_ANSWER_S)
    if "ok" in outcome:
        return outcome["ok"]
    why = outcome.get("error") or f"no answer in {GCS_ANSWER_S:g} s"
    raise NoCluster(f"something listens at --address {address} but it is not a Ray cluster's GCS "
                    f"({str(why).splitlines()[0]}); check the port (`ray start --head` prints it)")


@contextlib.contextmanager
def _quiet_stderr():
    """Ray's C++ client logs each refused attempt on file descriptor 2; physfarm says it in one line."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# -- starting --------------------------------------------------------------------------------------
def start_local(num_cpus: int, lan: bool = False) -> str:
    """Start a Ray for this process (the trials' cores, no dashboard) and return its address.
    On 127.0.0.1 only unless `lan`."""
    import ray

    if not lan:
        _loopback_mode()
    ray.init(num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    return current_address()


def _loopback_mode() -> None:
    """Ray's single-machine mode: the node address is 127.0.0.1 and so is every socket's."""
    from ray._private import ray_constants

    os.environ[_LOOPBACK_MODE] = "0"  # for the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray was imported: set it for this process


def current_address() -> str:
    """HOST:PORT of the Ray this process is connected to (its GCS)."""
    import ray

    return ray.get_runtime_context().gcs_address


def attach_command(address: str) -> str:
    """The one command that looks at the devices of the Ray at `address` from another shell."""
    return f"physfarm devices ls --address {address}"


# -- the Ray a command uses -------------------------------------------------------------------------
def usable_cpus() -> int:
    """The cores this process may run on (its CPU affinity: `taskset`, a batch scheduler's cpuset),
    which is what a local Ray should offer trials; os.cpu_count() counts the whole machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API on this platform
        return os.cpu_count() or 1


def check_trial_cpus(cfg, address: str | None) -> None:
    """A local sweep whose trials each ask for more CPUs than the local Ray will have would wait
    forever with every trial PENDING: refuse it before anything starts. (On a cluster, --address,
    Tune itself says which resources are missing; the cluster may still grow.)"""
    if address:
        return
    have = usable_cpus()
    if cfg.sweep.trial_cpus > have:
        raise ConfigError(
            f"sweep.trial_cpus: {cfg.sweep.trial_cpus:g} CPUs per trial, but the local Ray this sweep starts "
            f"has {have} (this process's CPU affinity), so no trial could ever start; set "
            f"sweep.trial_cpus to at most {have}, or run on a larger cluster with --address")


def init_ray(address: str | None, lan: bool = False) -> str:
    """Join the cluster at `address` (farm/raycluster.py: token authentication as the cluster needs
    it), or start a local Ray for this process on 127.0.0.1 only (`lan`: on the machine's network
    address, for lab PCs to join). Returns the address of the Ray in use."""
    import ray

    if ray.is_initialized():
        return current_address()
    if address:
        return join(address)
    return start_local(usable_cpus(), lan=lan)
