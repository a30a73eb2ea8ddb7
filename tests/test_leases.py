"""The lease table on its own, on a fake clock (no Ray, no sleeping): who is admitted, tokens,
expiry at `until` and after a missed heartbeat, renewal, release, and the refusals' wording."""
from __future__ import annotations

import pytest

from actors.errors import DeviceLeasedError
from actors.leases import LeaseTable

T0 = 1_700_000_000.0  # a wall time
TOKEN, OTHER = "a" * 32, "b" * 32


class FakeClock:
    """A wall and a monotonic clock that move only when told (together, as real ones do)."""

    def __init__(self):
        self.wall_now, self.mono_now = T0, 100.0

    def wall(self) -> float:
        return self.wall_now

    def mono(self) -> float:
        return self.mono_now

    def advance(self, seconds: float) -> None:
        self.wall_now += seconds
        self.mono_now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _table(clock: FakeClock, policy: str = "refuse", **kw) -> tuple[LeaseTable, list[str]]:
    ended: list[str] = []
    table = LeaseTable("osc", "osc#0", policy, wall=clock.wall, mono=clock.mono,
                       on_end=lambda: ended.append("ended"), **kw)
    return table, ended


def test_without_a_lease_everyone_is_admitted(clock):
    table, _ = _table(clock)
    assert table.active() is None and table.info() is None and table.remaining_s() is None
    assert table.admits("anyone", None) and not table.refuses("anyone", None)


def test_a_lease_admits_its_token_its_holder_and_clients_under_it_only(clock):
    table, _ = _table(clock)
    info, began = table.acquire("alice", TOKEN, until=T0 + 60, heartbeat_s=10, job="01000000")
    assert began and info["holder"] == "alice" and info["remaining_s"] == 10  # the heartbeat comes first
    assert info["until"] == T0 + 60 and info["job"] == "01000000" and info["since"] == T0
    assert table.admits("alice", None) and table.admits("alice/trial_1", None)
    assert table.admits("bob", TOKEN)  # the token admits whoever carries it
    assert not table.admits("bob", None) and not table.admits("alice2", None)  # not under 'alice/'
    assert table.refuses("bob", None) and not table.refuses("alice/x", None)


def test_wait_policy_holds_back_rather_than_refuses(clock):
    table, _ = _table(clock, policy="wait")
    table.acquire("alice", TOKEN, until=T0 + 60)
    assert not table.admits("bob", None) and not table.refuses("bob", None)


def test_a_lease_lapses_after_a_missed_heartbeat_and_heartbeats_keep_it(clock):
    table, ended = _table(clock)
    table.acquire("alice", TOKEN, until=T0 + 3600, heartbeat_s=10)
    for _ in range(5):  # renewed within every 10 s: kept well past heartbeat_s
        clock.advance(9)
        info, began = table.acquire("alice", TOKEN, until=T0 + 3600, heartbeat_s=10)
        assert not began and info["remaining_s"] == 10
    assert table.remaining_s() == 10 and not ended
    clock.advance(10)  # the holder died: no heartbeat for heartbeat_s
    assert table.active() is None and ended == ["ended"]
    assert table.admits("bob", None)


def test_a_lease_ends_at_until(clock):
    table, ended = _table(clock)
    table.acquire("alice", TOKEN, until=T0 + 5, heartbeat_s=60)
    clock.advance(4.5)
    assert table.remaining_s() == pytest.approx(0.5)
    clock.advance(0.5)
    assert table.info() is None and ended == ["ended"]


def test_a_lease_cannot_be_taken_over_or_released_by_another_token(clock):
    table, ended = _table(clock)
    table.acquire("alice", TOKEN, until=T0 + 60)
    with pytest.raises(DeviceLeasedError, match=r"device 'osc' \(osc#0\) is reserved by 'alice' until "
                                                r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(lease requested by 'bob' refused\)"):
        table.acquire("bob", OTHER, until=T0 + 60)
    with pytest.raises(DeviceLeasedError, match="only its holder can release it.*cannot be taken over"):
        table.release(OTHER)
    assert table.active().holder == "alice" and not ended
    assert table.release(TOKEN) and ended == ["ended"]
    assert not table.release(TOKEN)  # none any more
    assert table.acquire("bob", OTHER, until=T0 + 60)[1]  # free again: bob's is a new lease


def test_a_lapsed_lease_is_re_created_by_its_holders_next_heartbeat(clock):
    table, _ = _table(clock)
    table.acquire("alice", TOKEN, until=T0 + 3600, heartbeat_s=10)
    clock.advance(11)  # e.g. the actor restarted, or the holder stalled
    info, began = table.acquire("alice", TOKEN, until=T0 + 3600, heartbeat_s=10)
    assert began and info["since"] == T0 + 11


@pytest.mark.parametrize("kwargs, needle", [
    ({"holder": " "}, "lease holder must be a non-empty name, got ' '"),
    ({"token": "short"}, "lease token must be a string of at least 8 characters"),
    ({"until": T0}, "is not in the future; give seconds > 0"),
    ({"until": T0 + 7200}, "lease of 7200 s on device 'osc' exceeds the device's max_lease_s=3600; ask for less"),
    ({"heartbeat_s": -1}, r"heartbeat_s must be in \[0, 3600\] \(0: no heartbeat.*got -1"),
])
def test_bad_lease_requests_name_the_value_and_the_limit(clock, kwargs, needle):
    table, _ = _table(clock, max_lease_s=3600)
    args = {"holder": "alice", "token": TOKEN, "until": T0 + 60, **kwargs}
    with pytest.raises(ValueError, match=needle):
        table.acquire(**args)
    assert table.active() is None


def test_unknown_policy_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="lease_policy must be 'refuse' or 'wait', got 'never'"):
        LeaseTable("osc", "osc#0", "never")


def test_a_lease_without_heartbeat_lasts_to_its_end_and_outlives_the_table_in_its_file(clock, tmp_path):
    table, _ = _table(clock, max_lease_s=3600)
    table.path = tmp_path / "osc.0.lease.json"
    table.acquire("carol", TOKEN, T0 + 600, heartbeat_s=0)
    clock.advance(500)  # no heartbeat came: it holds all the same
    assert not table.admits("dave", None) and table.admits("x", None, user="carol")
    again, _ = _table(clock, max_lease_s=3600)  # a restarted actor
    again.path = table.path
    again.load()
    assert not again.admits("dave", None) and again.info()["holder"] == "carol"
    assert again.release(TOKEN) and not table.path.exists()
    clock.advance(200)
    assert table.admits("dave", None)  # the first one's end has passed too
