"""Placement on a lab cluster: cluster.yaml passes Ray's own launcher validation, and on a real
two-node Ray (ray.cluster_utils.Cluster) a device pinned by a custom resource lands on the node that
advertises it, is reached from a task on the other node, and a standing pool started by the CLI
outlives the CLI."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from ray import cloudpickle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.errors import DeviceError
from farm.client import DeviceClient
from farm.config import DeviceConfig
from farm.pool import NAMESPACE, pool_status, running_devices, start_device, stop_device

REPO = Path(__file__).resolve().parents[1]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the pinned task below runs on a worker


# -- cluster.yaml (no Ray needed) -----------------------------------------------------------------------
def test_cluster_yaml_passes_rays_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert raw["provider"]["type"] == "local" and raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does before validating
    validate_config(prepared)
    assert prepared["max_workers"] == len(raw["provider"]["worker_ips"])
    broken = copy.deepcopy(prepared)
    broken["worker_start_ray_commands"] = "ray start"
    with pytest.raises(Exception, match="is not of type 'array'"):
        validate_config(broken)


def test_lab_pcs_advertise_their_device_from_a_per_host_file(tmp_path):
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    start = next(c for c in raw["worker_start_ray_commands"] if "ray start" in c)
    m = re.search(r'--resources="(\$\(.*\))"', start)
    assert m and "~/.physfarm/resources.json" in m.group(1)
    (tmp_path / ".physfarm").mkdir()
    (tmp_path / ".physfarm" / "resources.json").write_text('{"optics_table": 1}')
    for home, expected in ((tmp_path, {"optics_table": 1}), (tmp_path / "nothing", {})):
        out = subprocess.run(["bash", "-c", f'echo "{m.group(1)}"'], capture_output=True, text=True,
                             env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, check=True).stdout
        assert json.loads(out) == expected  # what `ray start --resources=` receives on that PC


# -- a real two-node cluster ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    table = cluster.add_node(num_cpus=1, resources={"optics_table": 1}, labels={"physfarm/device": "optics"})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    head_id = ray.get_runtime_context().get_node_id()
    yield {"address": cluster.address, "head": head_id, "table": table.node_id}
    ray.shutdown()
    cluster.shutdown()


@ray.remote(num_cpus=1)
def measure_from_here(device: str, client_id: str = "remote-trial") -> tuple[str, list, int]:
    client = DeviceClient(device, client_id=client_id).connect()
    y = client.forward(np.full((5, 4), 0.2, np.float32), np.zeros(20, np.float32))
    return ray.get_runtime_context().get_node_id(), list(y.shape), client.channel_requests


def test_device_lands_on_the_node_with_its_resource_and_serves_the_other(lab):
    assert lab["head"] != lab["table"]
    handles = start_device(DeviceConfig(name="optics", system={"kind": "oscillators", "n": 4},
                                        resources={"optics_table": 1}, node_labels={"physfarm/device": "optics"}))
    try:
        info = ray.get(handles[0].info.remote())
        assert info["node_id"] == lab["table"]  # pinned where the hardware is
        on_head = NodeAffinitySchedulingStrategy(node_id=lab["head"], soft=False)
        node, shape, direct = ray.get(measure_from_here.options(scheduling_strategy=on_head).remote("optics"))
        assert node == lab["head"] and shape == [5, 4]  # a trial elsewhere reaches it by name
        assert direct == 0  # over Ray: the device's local channel is for its own node only
        on_table = NodeAffinitySchedulingStrategy(node_id=lab["table"], soft=False)
        node, shape, direct = ray.get(measure_from_here.options(scheduling_strategy=on_table).remote(
            "optics", "beside-it"))
        assert node == lab["table"] and shape == [5, 4] and direct == 1  # on its node: the local channel
        stats = ray.get(handles[0].stats.remote())
        assert stats["clients"]["remote-trial"]["rows"] == 5 and stats["clients"]["beside-it"]["rows"] == 5
    finally:
        stop_device("optics")


def test_a_device_no_node_can_host_fails_at_once_naming_the_resource(lab):
    with pytest.raises(DeviceError, match=r"device 'scope' needs resources \{'scope_bench': 1.0\} but no node.*"
                                          r"optics_table.*ray start --address"):
        start_device(DeviceConfig(name="scope", system={"kind": "oscillators", "n": 4},
                                  resources={"scope_bench": 1}))
    with pytest.raises(DeviceError, match=r"needs node labels \{'physfarm/device': 'scope'\} but no node"):
        start_device(DeviceConfig(name="scope", system={"kind": "oscillators", "n": 4},
                                  node_labels={"physfarm/device": "scope"}))
    with pytest.raises(DeviceError, match=r"2 replicas each need resources \{'optics_table': 1.0\} but .* only 1"):
        start_device(DeviceConfig(name="scope", system={"kind": "oscillators", "n": 4},
                                  resources={"optics_table": 1}, replicas=2))


def test_standing_pool_outlives_the_cli_that_started_it(lab, tmp_path):
    pool = tmp_path / "pool.yaml"
    pool.write_text("devices:\n  - name: standing\n    system: {kind: oscillators, n: 4}\n"
                    "    resources: {optics_table: 0.5}\n    replicas: 2\n")
    proc = subprocess.run([sys.executable, "-m", "farm.cli", "devices", "up", str(pool),
                           "--address", lab["address"]], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "up: standing (oscillators, 2 replicas)" in proc.stdout
    try:
        assert running_devices()["standing"] == [0, 1]  # detached: alive after the CLI's driver left
        client = DeviceClient("standing", client_id="later").connect()
        assert client.forward(np.zeros((3, 4), np.float32), np.zeros(20, np.float32)).shape == (3, 4)
        rows = [r for r in pool_status() if r["device"] == "standing"]
        assert [r["replica"] for r in rows] == [0, 1]
        assert all(r["status"] == "alive" and r["node_id"] == lab["table"] for r in rows)
        assert sum(len(r["active_clients"]) for r in rows) == 1
    finally:
        stop_device("standing")
    assert "standing" not in running_devices()
