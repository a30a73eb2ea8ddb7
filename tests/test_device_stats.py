"""The device accounting on its own, on a fake clock (no Ray, no sleeping): counters, busy time and
utilisation (total and recent), per-client wait and device-time shares, active clients, reset."""
from __future__ import annotations

import pytest

from actors.device_stats import DeviceStats


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_call_counts_rows_requests_busy_time_and_each_clients_share(clock):
    stats = DeviceStats(clock)
    a = stats.arrive("a")
    clock.advance(1.0)
    b = stats.arrive("b")
    clock.advance(0.5)
    stats.call_starts([("a", a), ("b", b)])
    clock.advance(2.0)  # the device call
    stats.call_succeeds([("a", 3), ("b", 1)])
    c = stats.counters(clock.now)
    assert (c["calls"], c["rows"], c["requests"], c["errors"], c["refused"]) == (1, 4, 2, 0, 0)
    assert c["busy_s"] == pytest.approx(2.0) and c["span_s"] == pytest.approx(3.5)
    assert c["utilisation"] == pytest.approx(2.0 / 3.5) and not c["in_call"] and c["now"] == clock.now
    usage = stats.clients()
    assert usage["a"] == {"requests": 1, "rows": 3, "wait_s": pytest.approx(1.5), "device_s": pytest.approx(1.5),
                          "user": None}
    assert usage["b"] == {"requests": 1, "rows": 1, "wait_s": pytest.approx(0.5), "device_s": pytest.approx(0.5),
                          "user": None}


def test_a_call_in_progress_counts_as_busy_and_a_failed_one_as_an_error(clock):
    stats = DeviceStats(clock)
    stats.call_starts([("a", stats.arrive("a"))])
    clock.advance(1.0)
    c = stats.counters(clock.now)
    assert c["in_call"] and c["busy_s"] == pytest.approx(1.0)
    stats.call_fails()
    c = stats.counters(clock.now)
    assert not c["in_call"] and c["errors"] == 1 and c["calls"] == 0 and c["busy_s"] == pytest.approx(1.0)
    assert stats.clients()["a"]["requests"] == 0  # a failed call serves no rows


def test_refusals_are_counted_apart_from_errors(clock):
    stats = DeviceStats(clock)
    stats.refuse()
    stats.refuse()
    c = stats.counters(clock.now)
    assert c["refused"] == 2 and c["errors"] == 0 and c["span_s"] == 0 and c["utilisation"] == 0


def test_recent_utilisation_covers_the_last_window_only(clock):
    stats = DeviceStats(clock, window_s=10.0)
    clock.advance(20.0)
    stats.call_starts([("a", stats.arrive("a"))])
    clock.advance(5.0)
    stats.call_succeeds([("a", 1)])
    assert stats.counters(clock.now)["utilisation_recent"] == pytest.approx(0.5)  # 5 s busy of 10
    clock.advance(7.0)  # the call ended 7 s ago: 3 s of it still inside the window
    assert stats.counters(clock.now)["utilisation_recent"] == pytest.approx(0.3)
    clock.advance(10.0)
    assert stats.counters(clock.now)["utilisation_recent"] == 0.0
    assert stats.counters(clock.now)["busy_s"] == pytest.approx(5.0)  # the total keeps it


def test_active_clients_are_those_seen_in_the_window_and_those_queued(clock):
    stats = DeviceStats(clock, window_s=60.0)
    stats.arrive("old")
    clock.advance(61.0)
    stats.arrive("new")
    assert stats.active_clients(clock.now) == ["new"]
    assert stats.active_clients(clock.now, also=["queued", "new"]) == ["new", "queued"]


def test_reset_starts_afresh_and_keeps_only_the_rest_of_a_call_in_progress(clock):
    stats = DeviceStats(clock)
    stats.call_starts([("a", stats.arrive("a"))])
    clock.advance(3.0)
    stats.reset()
    assert stats.counters(clock.now)["busy_s"] == pytest.approx(0.0) and stats.clients() == {}
    clock.advance(1.0)
    stats.call_succeeds([("a", 2)])
    c = stats.counters(clock.now)
    assert c["busy_s"] == pytest.approx(1.0) and c["calls"] == 1 and c["rows"] == 2


def test_usage_per_user_sums_the_users_clients_and_a_restore_adds_an_earlier_life(clock):
    from actors.audit import Usage

    stats = DeviceStats(clock)
    t = [stats.arrive("alice-sweep/1", "alice"), stats.arrive("alice-sweep/2", "alice"), stats.arrive("nb", "bob")]
    stats.call_starts([("alice-sweep/1", t[0]), ("alice-sweep/2", t[1]), ("nb", t[2])])
    clock.advance(1.0)
    stats.call_succeeds([("alice-sweep/1", 2), ("alice-sweep/2", 1), ("nb", 1)])
    users = stats.users(clock.now)
    assert users["alice"]["rows"] == 3 and users["alice"]["device_s"] == pytest.approx(0.75)
    assert users["bob"] == {"requests": 1, "rows": 1, "wait_s": 0.0, "device_s": pytest.approx(0.25), "active": True}
    clock.advance(1000.0)
    assert not stats.users(clock.now)["bob"]["active"]
    # A restarted replica adds what its audit log says the earlier life did: nothing restarts at zero.
    stats.restore(5, 50, 6, 1, {"nb": Usage(requests=4, rows=40, device_s=2.0, wait_s=0.5, user="bob"),
                                "old": Usage(requests=2, rows=10, device_s=1.0, wait_s=0.0, user="carol")})
    c = stats.counters(clock.now)
    assert (c["calls"], c["rows"], c["requests"], c["errors"]) == (6, 54, 9, 1)
    assert stats.clients()["nb"]["rows"] == 41 and stats.clients()["nb"]["device_s"] == pytest.approx(2.25)
    assert stats.users(clock.now)["carol"]["rows"] == 10
