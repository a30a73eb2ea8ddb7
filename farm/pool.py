"""The device pool: start, find, list and stop named device actors in the `physfarm` namespace.

A device named `osc` with R replicas is R actors named `osc#0` .. `osc#{R-1}`. Each reserves no CPU
(num_cpus=0: it mostly waits on hardware) and is pinned to the node with the hardware by custom
resources (`resources: {optics_table: 1}`) and/or node labels (`node_labels: {...}`) from its
`DeviceConfig`. A standing pool (`physfarm devices up POOL.yaml`) starts them detached: they live
until `physfarm devices down` or the cluster stops. A sweep starts non-detached ones for the devices
that are not up and stops them at its end.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import ray


from actors.errors import DeviceError

from .config import DeviceConfig, DeviceList, check_systems, read_yaml, validated
from .errors import ConfigError
from .raycalls import get, get_all

NAMESPACE = "physfarm"
_ACTOR_NAME = re.compile(r"^(?P<device>[A-Za-z0-9][A-Za-z0-9_.-]*)#(?P<replica>\d+)$")


def actor_name(device: str, replica: int = 0) -> str:
    return f"{device}#{replica}"


def parse_actor_name(name: str) -> tuple[str, int] | None:
    """(device, replica) for an actor name like 'osc#1'; None for other actors."""
    m = _ACTOR_NAME.match(name)
    return (m["device"], int(m["replica"])) if m else None


# -- pool files -----------------------------------------------------------------------------------
class PoolConfig(DeviceList):
    """A POOL.yaml: the `devices:` list of a sweep config, nothing else."""


def parse_pool(raw, source: str = "pool") -> PoolConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with the key 'devices' "
                          f"(a list of devices as in a sweep config); got {type(raw).__name__}")
    pool = validated(PoolConfig, raw)
    check_systems(pool)
    return pool


def load_pool(path: str | Path) -> PoolConfig:
    """Read and validate a POOL.yaml (a sweep config's file works too: only `devices` is read)."""
    path = Path(path)
    raw = read_yaml(path, "pool file '{path}' does not exist; see examples/pool.yaml")
    if isinstance(raw, dict) and "devices" in raw:
        raw = {"devices": raw["devices"]}  # a sweep config's other sections are not the pool's
    return parse_pool(raw, str(path))


# -- placement ------------------------------------------------------------------------------------
def _check_placeable(dev: DeviceConfig) -> None:
    """Fail at once, naming what is missing, when the cluster's nodes cannot host all replicas."""
    if not dev.resources and not dev.node_labels:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    need = {k: float(v) for k, v in dev.resources.items() if float(v) > 0}
    fits = 0  # replicas the matching nodes can host at once (by total resources, ignoring others' use)
    for node in nodes:
        have = node.get("Resources", {})
        labels = node.get("Labels", {}) or {}
        if not all(labels.get(k) == v for k, v in dev.node_labels.items()):
            continue
        fits += min((int(have.get(k, 0.0) // v) for k, v in need.items()), default=dev.replicas)
    if fits >= dev.replicas:
        return
    offered = sorted({k for n in nodes for k in n.get("Resources", {})
                      if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")})
    wanted = []
    if need:
        wanted.append(f"resources {need}")
    if dev.node_labels:
        wanted.append(f"node labels {dev.node_labels}")
    example = next(iter(need), "name")
    if fits > 0:
        raise DeviceError(
            f"device '{dev.name}': {dev.replicas} replicas each need {' and '.join(wanted)} but the cluster's "
            f"nodes can host only {fits}; lower `replicas`, or ask for a fraction per replica (e.g. "
            f"resources: {{{example}: {1 / dev.replicas:.2g}}}) if the hardware can serve them all")
    raise DeviceError(
        f"device '{dev.name}' needs {' and '.join(wanted)} but no node of the cluster offers them "
        f"(custom resources offered: {offered or 'none'}). On the PC with the hardware, join the "
        f"cluster with `ray start --address=HEAD_IP:6379 --resources='{{\"{example}\": 1}}'`"
        f" (or --labels), or fix `resources`/`node_labels` of the device; see docs/pool.md"
    )


def start_device(dev: DeviceConfig, detached: bool = False, timeout_s: float = 120.0) -> list:
    """Start the replicas of one device (or reuse ones already up). Returns the actor handles.

    Keep the handles: a non-detached actor dies when its last handle is dropped.
    """
    return await_device(dev, launch_device(dev, detached), timeout_s)


def launch_device(dev: DeviceConfig, detached: bool = False) -> tuple[list, list]:
    """Ask Ray for the replicas of one device and return at once, (handles, the ones created here),
    while their processes start; `await_device` waits for them. A sweep launches its devices as soon
    as Ray is up and waits for them only when it needs them."""
    _check_placeable(dev)
    handles, created = [], []
    from actors.device_actor import RAY_THREADS, DeviceActor  # torch: only where a device is started

    cls = ray.remote(DeviceActor)
    policy = {"retries": dev.retries, "backoff_s": dev.retry_backoff_s, "timeout_s": dev.call_timeout_s,
              "restart_wait_s": dev.restart_wait_s}
    for i in range(dev.replicas):
        name = actor_name(dev.name, i)
        existed = find_device(dev.name, i) is not None
        options = dict(
            name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=dev.max_restarts,
            max_concurrency=RAY_THREADS, resources=dict(dev.resources) or None, get_if_exists=True,
        )
        if dev.node_labels:
            options["label_selector"] = dict(dev.node_labels)
        if detached:
            options["lifetime"] = "detached"
        handle = cls.options(**options).remote(
            dev.system, name=name, max_wait_s=dev.max_wait_ms / 1000.0, max_queue_rows=dev.max_queue_rows,
            lease_policy=dev.lease_policy, max_lease_s=dev.max_lease_s, device=dev.name, replica=i,
            replicas=dev.replicas, client_policy=policy, audit_dir_path=dev.audit_dir,
            quotas=dev.quotas.model_dump() if dev.quotas else None,
            priorities=dev.priorities.for_actor() if dev.priorities else None,
            local_channel=dev.local_channel,
        )
        handles.append(handle)
        if not existed:
            created.append(handle)
    return handles, created


def await_device(dev: DeviceConfig, launched: tuple[list, list], timeout_s: float = 120.0) -> list:
    """Wait until the launched replicas answer and are connected; returns their handles. A device that
    cannot start fails here, not in a trial (the replicas created for it are killed)."""
    handles, created = launched
    refs = [h.ping.remote() for h in handles]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    try:
        if pending:
            raise DeviceError(
                f"device '{dev.name}': {len(pending)} of {dev.replicas} replicas did not start within "
                f"{timeout_s:.0f} s (resources {dict(dev.resources) or 'none'}, node labels "
                f"{dict(dev.node_labels) or 'none'}); check that a node offers them and has memory free "
                f"(`ray status`)")
        ray.get(ready)
        # Connect now (a recorded device fits or loads its replay model, an instrument opens its link):
        # a device that cannot start fails here, and no trial's device time includes the start.
        try:
            get_all([h.connect.remote() for h in handles], timeout_s)
        except (ValueError, DeviceError) as err:
            raise DeviceError(f"device '{dev.name}' could not connect: {err}") from None
        except ray.exceptions.GetTimeoutError:
            raise DeviceError(f"device '{dev.name}' did not connect within {timeout_s:.0f} s") from None
    except BaseException:
        for h in created:
            ray.kill(h, no_restart=True)
        raise
    return handles


def device_metadata(names: Iterable[str], timeout_s: float = 60.0) -> dict[str, dict]:
    """{device: what its system reports of itself} (replica 0; {} where a system reports nothing)."""
    out = {}
    for name in names:
        handle = find_device(name)
        if handle is None:
            continue
        try:
            out[name] = get(handle.metadata.remote(), timeout_s)
        except Exception:  # noqa: BLE001 - a device that cannot say stays undescribed; it still serves
            out[name] = {}
    return out


def find_device(name: str, replica: int = 0):
    """The handle of a running device replica, or None."""
    try:
        return ray.get_actor(actor_name(name, replica), namespace=NAMESPACE)
    except ValueError:
        return None


def running_devices(namespace: str = NAMESPACE) -> dict[str, list[int]]:
    """Device name -> sorted replica indexes of the device actors alive (or restarting) now."""
    found: dict[str, list[int]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] != namespace:
            continue
        parsed = parse_actor_name(entry["name"])
        if parsed:
            found.setdefault(parsed[0], []).append(parsed[1])
    return {k: sorted(v) for k, v in sorted(found.items())}


def stop_device(dev_name: str, replicas: int | None = None, close_timeout_s: float = 5.0) -> int:
    """Stop a device's replicas (all that are running when `replicas` is None). Returns how many.

    Each replica first closes its system (after the device call in progress, so an instrument is
    left in order), for at most `close_timeout_s`; then its actor is killed for good.
    """
    indexes = running_devices().get(dev_name, []) if replicas is None else range(replicas)
    handles = [h for h in (find_device(dev_name, i) for i in indexes) if h is not None]
    if handles:
        ray.wait([h.close.remote() for h in handles], num_returns=len(handles), timeout=close_timeout_s)
    for handle in handles:
        ray.kill(handle, no_restart=True)
    return len(handles)


@contextlib.contextmanager
def devices_started(devices: Iterable[DeviceConfig],
                    launched: dict[str, tuple[list, list]] | None = None) -> Iterator[list[DeviceConfig]]:
    """Start each device that is not already up (a standing device of that name is used as it is),
    yield the ones started here, and stop exactly those at the end, also on an error or Ctrl-C.
    `launched`: {name: launch_device(...)} of devices this process launched already (waited for here).
    A sweep, `physfarm train` and `physfarm eval` all hold their devices so."""
    started: list[tuple[DeviceConfig, list]] = []  # the handles too: a non-detached actor lives by them
    launched = dict(launched or {})
    try:
        for dev in devices:
            # launched by this process a moment ago, or not up yet: ours to wait for and to stop
            mine = launched.pop(dev.name, None)
            if mine is None and find_device(dev.name) is None:
                mine = launch_device(dev)
            if mine is not None:
                started.append((dev, await_device(dev, mine)))
        yield [dev for dev, _handles in started]
    finally:
        for dev, _handles in started:
            stop_device(dev.name, dev.replicas)


def pool_status(timeout_s: float = 3.0) -> list[dict]:
    """One row per device replica: where it runs, whether it answers, load, clients and lease.

    Asks every replica at once; `stats` never waits behind a device call, so a replica that does not
    answer within `timeout_s` is reported as such (restarting, hung or overloaded).
    """
    devices = running_devices()
    keys = [(d, i) for d, idx in devices.items() for i in idx]
    handles = {k: find_device(*k) for k in keys}
    info_refs = {k: h.info.remote() for k, h in handles.items() if h is not None}
    stats_refs = {k: h.stats.remote() for k, h in handles.items() if h is not None}
    refs = list(info_refs.values()) + list(stats_refs.values())
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    rows = []
    for key in keys:
        row = {"device": key[0], "replica": key[1], "actor": actor_name(*key)}
        try:
            info = ray.get(info_refs[key], timeout=0)
            stats = ray.get(stats_refs[key], timeout=0)
        except ray.exceptions.GetTimeoutError:
            row["status"] = f"no answer in {timeout_s:g} s"
        except (ray.exceptions.RayActorError, KeyError) as err:
            row["status"] = "dead" if isinstance(err, ray.exceptions.ActorDiedError) else "unavailable"
        else:
            lease = stats["lease"]
            row.update(
                status="alive (restarted)" if info["restarted"] else "alive",
                node=info["node_ip"], node_id=info["node_id"], hostname=info["hostname"],
                system=info["system"], utilisation=stats["utilisation_recent"],
                queued_rows=stats["queued_rows"], queued_requests=stats["queued_requests"],
                active_clients=stats["active_clients"], lease=lease,
                calls=stats["calls"], rows=stats["rows"], clients=stats["clients"], users=stats["users"],
                restarts=stats["restarts"], audit=stats["audit"], reservations=stats["reservations"],
            )
        rows.append(row)
    return rows
