"""The device pool: start, find and stop named device actors in the `physfarm` namespace."""
from __future__ import annotations

import ray

from actors.device_actor import DeviceActor

from .config import DeviceConfig

NAMESPACE = "physfarm"


def actor_name(device: str, replica: int = 0) -> str:
    return f"{device}#{replica}"


def start_device(dev: DeviceConfig, detached: bool = False) -> list:
    """Start the replicas of one device (or reuse ones already up). Returns the actor handles.

    The actor reserves no CPU (num_cpus=0: it mostly waits on hardware) and can be pinned to the
    node with the hardware by a custom resource in `dev.resources`.
    """
    handles = []
    cls = ray.remote(DeviceActor)
    for i in range(dev.replicas):
        name = actor_name(dev.name, i)
        options = dict(
            name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=dev.max_restarts,
            max_concurrency=1000, resources=dict(dev.resources) or None, get_if_exists=True,
        )
        if detached:
            options["lifetime"] = "detached"
        handle = cls.options(**options).remote(dev.system, name=name, max_wait_s=dev.max_wait_ms / 1000.0)
        handles.append(handle)
    ray.get([h.ping.remote() for h in handles])  # fail here, not in a trial, if a device cannot start
    return handles


def find_device(name: str, replica: int = 0):
    """The handle of a running device replica, or None."""
    try:
        return ray.get_actor(actor_name(name, replica), namespace=NAMESPACE)
    except ValueError:
        return None


def stop_device(dev_name: str, replicas: int = 1) -> int:
    stopped = 0
    for i in range(replicas):
        handle = find_device(dev_name, i)
        if handle is not None:
            ray.kill(handle, no_restart=True)
            stopped += 1
    return stopped
