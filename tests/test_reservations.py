"""Reservations (actors/reservations.py) on a fake clock: windows, overlaps refused with the booking in
the way, persistence in a file a restarted actor reads back, and the cheap check on the request path.
On a real Ray: `physfarm devices reserve / reservations / lease / release` from the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import ray

from actors.errors import DeviceLeasedError
from actors.reservations import ReservationBook
from farm.cli import main as cli_main
from farm.client import DeviceClient
from farm.config import DeviceConfig
from farm.pool import find_device, start_device, stop_device

H = 3600.0


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_window_serves_its_user_only_and_ends(tmp_path):
    clock = Clock()
    book = ReservationBook("optics", tmp_path / "optics.0.reservations.json", wall=clock)
    res = book.add("alice", clock.t + H, clock.t + 2 * H, by="alice")
    assert book.admits("bob") and book.current() is None  # not yet
    clock.t += 1.5 * H
    assert book.admits("alice") and not book.admits("bob") and book.remaining_s() == pytest.approx(0.5 * H)
    msg = str(book.refusal("optics#0", "bob"))
    assert "reserved for alice from" in msg and res["id"] in msg and "bob" in msg
    clock.t += H
    assert book.admits("bob") and book.current() is None and book.remaining_s() is None


def test_overlaps_are_refused_naming_the_booking_in_the_way_and_bad_windows_named(tmp_path):
    clock = Clock()
    book = ReservationBook("optics", tmp_path / "r.json", wall=clock)
    first = book.add("alice", clock.t + H, clock.t + 3 * H)
    with pytest.raises(ValueError, match=rf"already reserved for alice from .* \(id {first['id']}\), which overlaps"):
        book.add("bob", clock.t + 2 * H, clock.t + 4 * H)
    book.add("bob", clock.t + 3 * H, clock.t + 4 * H)  # back to back is fine
    with pytest.raises(ValueError, match="--to .* must be after --from"):
        book.add("bob", clock.t + 6 * H, clock.t + 5 * H)
    with pytest.raises(ValueError, match="which is past"):
        book.add("bob", clock.t - 2 * H, clock.t - H)
    with pytest.raises(KeyError, match="no reservation 'nope'"):
        book.cancel("nope")
    assert [r["user"] for r in book.list()] == ["alice", "bob"]
    book.cancel(first["id"])
    assert [r["user"] for r in book.list()] == ["bob"]


def test_the_book_survives_in_its_file_and_drops_what_has_ended(tmp_path):
    clock = Clock()
    path = tmp_path / "r.json"
    book = ReservationBook("optics", path, wall=clock)
    book.add("alice", clock.t, clock.t + H)
    book.add("bob", clock.t + 2 * H, clock.t + 3 * H)
    again = ReservationBook("optics", path, wall=clock)  # a restarted actor
    assert not again.admits("bob") and [r["user"] for r in again.list()] == ["alice", "bob"]
    clock.t += 1.5 * H
    again.add("carol", clock.t + 3 * H, clock.t + 4 * H)
    assert [r["user"] for r in json.loads(path.read_text())] == ["bob", "carol"]  # alice's has ended


# -- from the command line, on a real Ray ---------------------------------------------------------------
@pytest.fixture(scope="module")
def booked(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("book")
    handles = start_device(DeviceConfig(name="resv", system={"kind": "oscillators", "n": 4}, max_restarts=2,
                                        audit_dir=str(folder)))
    yield folder
    del handles
    stop_device("resv")


X, THETA = np.zeros((2, 4), np.float32), np.zeros(20, np.float32)


def test_reserve_from_the_cli_serves_only_its_user_and_survives_a_restart(booked, capsys, monkeypatch):
    monkeypatch.setenv("PHYSFARM_USER", "alice")
    assert cli_main(["devices", "reserve", "resv", "--from", "now", "--to", "+1h"]) == 0
    out = capsys.readouterr().out
    assert "reserved: resv for alice from" in out
    assert cli_main(["devices", "reserve", "resv", "--from", "+30m", "--to", "+2h", "--user", "bob"]) == 1
    assert "already reserved for alice" in capsys.readouterr().err
    alice = DeviceClient("resv", client_id="a", user="alice").connect()
    bob = DeviceClient("resv", client_id="b", user="bob").connect()
    assert alice.forward(X, THETA).shape == (2, 4)
    with pytest.raises(DeviceLeasedError, match="reserved for alice"):
        bob.forward(X, THETA)
    assert bob.retried == 0  # a refusal that would recur is not retried
    handle = find_device("resv")
    ray.kill(handle, no_restart=False)
    with pytest.raises(DeviceLeasedError, match="reserved for alice"):
        DeviceClient("resv", client_id="b2", user="bob", restart_wait_s=60).connect().forward(X, THETA)
    assert ray.get(handle.info.remote())["restarted"]
    assert cli_main(["devices", "reservations", "resv"]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and "resv" in listed
    assert cli_main(["devices", "ls"]) == 0
    assert "alice until" in capsys.readouterr().out.split("resv", 1)[1]
    rid = ray.get(handle.reservations.remote())[0]["id"]
    assert cli_main(["devices", "unreserve", "resv", rid]) == 0
    capsys.readouterr()
    assert bob.forward(X, THETA).shape == (2, 4)


def test_lease_and_release_from_the_cli(booked, capsys, monkeypatch):
    monkeypatch.setenv("PHYSFARM_USER", "carol")
    monkeypatch.setenv("HOME", str(booked))  # the lease's token is kept in ~/.physfarm/leases
    assert cli_main(["devices", "lease", "resv", "--for", "10m"]) == 0
    assert "leased: resv to carol until" in capsys.readouterr().out
    with pytest.raises(DeviceLeasedError, match="reserved by 'carol'"):
        DeviceClient("resv", client_id="dave-nb", user="dave").connect().forward(X, THETA)
    assert DeviceClient("resv", client_id="carol/nb", user="carol").connect().forward(X, THETA).shape == (2, 4)
    assert cli_main(["devices", "lease", "resv", "--for", "10m"]) == 1
    assert "reserved by 'carol'" in capsys.readouterr().err
    assert cli_main(["devices", "release", "resv"]) == 0
    assert "released: resv" in capsys.readouterr().out
    assert DeviceClient("resv", client_id="dave-nb", user="dave").connect().forward(X, THETA).shape == (2, 4)
    assert cli_main(["devices", "release", "resv"]) == 1
    assert "no lease on 'resv' taken from this account" in capsys.readouterr().err
