"""Priority classes in the fair queue (actors/fair_queue.py), as properties over random workloads:
a higher class goes first, fairness holds inside a class, and a waiting class goes unserved through
at most max_skips + C - 1 device calls in a row, C the classes in use (never starved beyond the
configured bound). Then on
the device actor: a user's class comes from the device's `priorities`."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.fair_queue import FairQueue


@dataclass
class Item:
    client: str
    rows: int


workloads = st.fixed_dictionaries({
    "clients": st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(1, 12), min_size=1, max_size=30)),
                        min_size=1, max_size=6),  # per client: its class, its request sizes
    "limit": st.integers(1, 24),
    "max_skips": st.integers(0, 5),
    "refill": st.booleans(),  # class-0 clients keep their queue full (they would starve the others)
})


@settings(max_examples=200, deadline=None)
@given(workloads)
def test_a_waiting_class_is_served_within_max_skips_plus_one_calls(w):
    q: FairQueue[Item] = FairQueue(max_skips=w["max_skips"])
    classes = {}
    for i, (k, sizes) in enumerate(w["clients"]):
        classes[f"c{i}"] = k
        q.push(f"c{i}", [Item(f"c{i}", n) for n in sizes], priority=k)
    unserved_for = {k: 0 for k in set(classes.values())}  # calls in a row a waiting class got nothing
    for _ in range(400):
        waiting = {classes[c] for c in q.clients()}
        if not waiting:
            break
        batch = q.take(w["limit"])
        assert batch  # something is always served
        got = {classes[i.client] for i in batch}
        # the highest class waiting is served, unless a class that waited too long went first
        top = min(waiting)
        assert top in got or any(unserved_for[k] >= w["max_skips"] for k in got)
        for k in waiting:
            unserved_for[k] = 0 if k in got else unserved_for[k] + 1
            assert unserved_for[k] <= w["max_skips"] + len(unserved_for) - 1, (k, unserved_for)
        if w["refill"]:
            for c, k in classes.items():
                if k == 0:
                    q.push(c, [Item(c, 4)], priority=0)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 5), st.integers(1, 4), st.integers(1, 8))
def test_fair_inside_a_class_whatever_the_other_classes_do(n_high, n_low, limit):
    q: FairQueue[Item] = FairQueue(max_skips=2)
    high = [f"h{i}" for i in range(n_high)]
    low = [f"l{i}" for i in range(n_low)]
    served = {c: 0 for c in high + low}
    for _ in range(60):
        for c in high:  # everyone keeps requests waiting, all the same size
            if c not in q.clients():
                q.push(c, [Item(c, 1)], priority=0)
        for c in low:
            if c not in q.clients():
                q.push(c, [Item(c, 1)], priority=1)
        for item in q.take(limit):
            served[item.client] += 1
        for group in (high, low):
            counts = [served[c] for c in group]
            assert max(counts) - min(counts) <= 1, served  # round-robin inside the class
    assert min(served[c] for c in low) > 0  # and the low class was not starved


def test_a_negative_bound_is_refused():
    with pytest.raises(ValueError, match="max_skips must be >= 0"):
        FairQueue(max_skips=-1)


# -- on the device actor (in-process, on asyncio: the code a Ray actor runs) ------------------------------
import asyncio  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402

from actors.device_actor import DeviceActor  # noqa: E402
from actors.spec import SystemSpec  # noqa: E402


class SlowTagConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str


class SlowTag:
    """4 rows per call, 5 ms per call; records whose rows (x[:, 0]: 0 bob, 1 alice) each call held."""

    config_class = SlowTagConfig

    def __init__(self, config):
        self.owners: list[set] = []
        self._lock = threading.Lock()

    @property
    def spec(self) -> SystemSpec:
        return SystemSpec(name="slowtag", n_inputs=1, n_params=1, n_outputs=1, input_range=(-10, 10),
                          param_range=(-10, 10), max_rows=4)

    def connect(self) -> None:
        pass

    def forward(self, x, theta) -> torch.Tensor:
        with self._lock:
            time.sleep(0.005)
            self.owners.append({int(v) for v in x[:, 0].tolist()})
            return x.clone()


def test_a_high_class_user_goes_first_and_the_normal_class_is_not_starved():
    actor = DeviceActor({"kind": f"{__name__}:SlowTag"}, name="prio#0",
                        priorities={"users": {"alice": 0}, "default": 1, "max_skips": 2})

    async def main():
        bob = [asyncio.wrap_future(actor.submit(np.zeros((4, 1), np.float32), np.zeros(1, np.float32),
                                                   f"bob/{i}", None, "bob")) for i in range(12)]
        await asyncio.sleep(0.002)  # bob's first call is on the device: alice comes while bob's 11 wait
        alice = [asyncio.wrap_future(actor.submit(np.ones((4, 1), np.float32), np.zeros(1, np.float32),
                                                     "alice/nb", None, "alice")) for _ in range(6)]
        await asyncio.gather(*bob, *alice)

    try:
        asyncio.run(main())
    finally:
        actor.close()
    order = ["alice" if 1 in o else "bob" for o in actor._system.owners]
    assert order.count("alice") == 6 and order.count("bob") == 12
    last_alice = max(i for i, who in enumerate(order) if who == "alice")
    assert last_alice <= 9, order  # alice's 6 calls went ahead of bob's waiting ones ...
    run = longest = 0
    for who in order[: last_alice + 1]:
        run = run + 1 if who == "alice" else 0
        longest = max(longest, run)
    assert longest <= 2, order  # ... but bob, waiting, went unserved through at most max_skips calls
