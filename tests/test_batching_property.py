"""Property: whatever mix of concurrent clients, request sizes and device max rows, dynamic batching
gives every client exactly its own rows, in order, with its own theta, and no device call exceeds the
device's max rows. The `DeviceActor` runs in-process, driven from asyncio through `submit` (the same code a Ray actor runs; its
concurrency is the event loop's), so hypothesis can try hundreds of interleavings in seconds.
"""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict

from actors.device_actor import DeviceActor
from actors.spec import SystemSpec


class TagConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    max_rows: int = 8


class TagSystem:
    """An exact device: y = [x, theta[0]] per row, and it records the size of every call."""

    config_class = TagConfig
    calls: list[int]

    def __init__(self, config: TagConfig):
        self.config = config
        self.calls = []  # rows per device call
        self.owners = []  # per device call: the clients (x[:, 0]) whose rows it held
        self._lock = threading.Lock()

    @property
    def spec(self) -> SystemSpec:
        return SystemSpec(name="tag", n_inputs=3, n_params=1, n_outputs=4, input_range=(-1e6, 1e6),
                          param_range=(-1e6, 1e6), max_rows=self.config.max_rows)

    def connect(self) -> None:
        pass

    def forward(self, x, theta) -> torch.Tensor:
        with self._lock:  # the actor must never call the device concurrently
            self.calls.append(x.shape[0])
            self.owners.append(sorted(set(int(v) for v in x[:, 0].tolist())))
            return torch.cat([x, theta[:, :1]], dim=1)


def _rows(client: int, request: int, n: int) -> np.ndarray:
    """Rows that name their owner: (client, request, row index)."""
    return np.array([[client, request, i] for i in range(n)], dtype=np.float32)


client_plans = st.lists(  # per client: its request sizes, and whether it sends them all at once
    st.tuples(st.lists(st.integers(1, 20), min_size=1, max_size=5), st.booleans()),
    min_size=1, max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=client_plans, max_rows=st.integers(1, 16), max_wait_ms=st.sampled_from([0.0, 0.5]))
def test_every_client_gets_exactly_its_rows_in_order(plans, max_rows, max_wait_ms):
    actor = DeviceActor({"kind": f"{__name__}:TagSystem", "max_rows": max_rows}, name="tag#0",
                        max_wait_s=max_wait_ms / 1000.0)

    async def client(c: int, sizes: list[int], concurrent: bool):
        reqs = [(_rows(c, r, n), np.array([1000 * c + r], np.float32)) for r, n in enumerate(sizes)]
        if concurrent:
            ys = await asyncio.gather(*(asyncio.wrap_future(actor.submit(x, t, f"c{c}")) for x, t in reqs))
        else:
            ys = [await asyncio.wrap_future(actor.submit(x, t, f"c{c}")) for x, t in reqs]
        return reqs, ys

    async def main():
        return await asyncio.gather(*(client(c, sizes, conc) for c, (sizes, conc) in enumerate(plans)))

    try:
        results = asyncio.run(main())
    finally:
        actor.close()
    for (reqs, ys) in results:
        for (x, t), y in zip(reqs, ys):
            assert y.shape == (len(x), 4)
            np.testing.assert_array_equal(y[:, :3], x)  # its own rows, in order
            np.testing.assert_array_equal(y[:, 3], np.full(len(x), t[0]))  # with its own theta
    calls = actor._system.calls
    total = sum(n for sizes, _ in plans for n in sizes)
    assert sum(calls) == total and max(calls) <= max_rows
    stats = actor.stats()
    assert stats["rows"] == total and stats["queued_rows"] == 0 and stats["queued_requests"] == 0
    per_client = {f"c{c}": sum(sizes) for c, (sizes, _) in enumerate(plans)}
    assert {k: v["rows"] for k, v in stats["clients"].items()} == per_client


@settings(max_examples=25, deadline=None)
@given(light=st.integers(1, 4), heavy_requests=st.integers(2, 6))
def test_round_robin_serves_a_light_client_within_one_turn(light, heavy_requests):
    """However many full-size requests a heavy client has queued, a light client's request goes into
    the next device call (it waits for at most the call in progress)."""
    actor = DeviceActor({"kind": f"{__name__}:TagSystem", "max_rows": 8}, name="tag#0")

    async def main():
        actor.connect()  # as a running device is: connected before the requests come
        heavy = [asyncio.wrap_future(actor.submit(_rows(0, r, 8), np.zeros(1, np.float32), "heavy"))
                 for r in range(heavy_requests)]
        # heavy's requests are queued once submit returns; the device thread serves them meanwhile
        # (it may have started several calls by now): the light one arrives after `before` calls began
        before = len(actor._system.owners)
        y = await asyncio.wrap_future(actor.submit(_rows(1, 0, light), np.zeros(1, np.float32), "light"))
        await asyncio.gather(*heavy)
        return y, before

    try:
        y, before = asyncio.run(main())
    finally:
        actor.close()
    assert y.shape == (light, 4)
    owners = actor._system.owners
    light_call = next(i for i, o in enumerate(owners) if 1 in o)
    # at most the call in progress when it arrived came first (one heavy call may also begin between
    # counting `before` and the light request being queued)
    assert light_call <= before + 1, (before, owners)
    assert len(owners) == heavy_requests + 1  # a full heavy request never shares a call
