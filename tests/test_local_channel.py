"""The local channel (actors/local_channel.py, farm/local_channels.py): forward requests to a device on
the client's node over a loopback socket beside Ray. On a real Ray: the same answers, refusals and
accounting as Ray's path; the secret and loopback; a caller that gives up; a restarted actor. The
server alone (a plain submit function, no Ray): a closed connection cancels its request."""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import ray

from actors.errors import DeviceLeasedError, DeviceTimeoutError, EnvelopeError
from actors.instrument import protocol as P
from actors.local_channel import CANCEL_POLL_S, ChannelServer
from bench.faults import listening_sockets
from farm.client import DeviceClient
from farm.config import DeviceConfig
from farm.pool import start_device, stop_device

N = 4  # oscillators: x[B, 4], theta[20]
THETA = np.zeros(N * N + N, np.float32)


def _x(rows: int, value: float = 0.1, seed: int | None = None) -> np.ndarray:
    if seed is None:
        return np.full((rows, N), value, np.float32)
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (rows, N)).astype(np.float32)


@pytest.fixture(scope="module")
def exact(ray_session):
    """A noise-free, drift-free device (so two paths' answers compare exactly)."""
    handles = start_device(DeviceConfig(name="exact", system={"kind": "oscillators", "n": N, "seed": 0,
                                                               "noise": 0.0, "drift": 0.0}))
    yield handles
    stop_device("exact")


@pytest.fixture(scope="module")
def slow(ray_session):
    """0.6 s per call, one replica, may restart."""
    handles = start_device(DeviceConfig(name="lcslow", system={"kind": "oscillators", "n": N, "seed": 0,
                                                                "latency_call_s": 0.6}, max_restarts=2))
    yield handles
    stop_device("lcslow")


def _raw(info: dict) -> socket.socket:
    sock = socket.create_connection((info["host"], info["port"]), timeout=10)
    return sock


def test_forward_over_the_channel_equals_the_ray_path_and_is_accounted_alike(exact):
    (h,) = exact
    direct = DeviceClient("exact", client_id="direct").connect()
    over_ray = DeviceClient("exact", client_id="over-ray", local_channel=False).connect()
    before = ray.get(h.stats.remote())
    for seed in range(3):
        x = _x(37, seed=seed)
        np.testing.assert_array_equal(direct.forward(x, THETA).numpy(), over_ray.forward(x, THETA).numpy())
    assert direct.channel_requests == 3 and over_ray.channel_requests == 0
    after = ray.get(h.stats.remote())
    assert after["requests"] - before["requests"] == 6 and after["rows"] - before["rows"] == 6 * 37
    for cid in ("direct", "over-ray"):
        assert after["clients"][cid]["requests"] == 3 and after["clients"][cid]["rows"] == 3 * 37
    audited = [r for r in ray.get(h.audit.remote()) if r.get("run") in ("direct", "over-ray")]
    assert sorted(r["run"] for r in audited) == ["direct"] * 3 + ["over-ray"] * 3
    # The overlapped form (submit now, result later) takes the channel too.
    pending = direct.submit(_x(5, seed=9), THETA)
    assert pending.result().shape == (5, N) and direct.channel_requests == 4
    # Two requests in flight at once take two connections; close() (a trial's end) closes them.
    both = [direct.submit(_x(3, seed=s), THETA) for s in (1, 2)]
    assert [b.result().shape for b in both] == [(3, N), (3, N)]
    opened = ray.get(h.stats.remote())["local_channel"]["connections"]
    assert opened >= 2
    direct.close()
    _until(lambda: ray.get(h.stats.remote())["local_channel"]["connections"] == opened - 2)
    assert direct.forward(_x(1), THETA).shape == (1, N) and direct.channel_requests == 7  # reopened


def test_refusals_come_back_as_the_device_errors_once_and_unretried(exact):
    (h,) = exact
    direct = DeviceClient("exact", client_id="direct", retries=3).connect()
    over_ray = DeviceClient("exact", client_id="over-ray", local_channel=False).connect()
    bad = _x(2, np.nan)
    refused = ray.get(h.stats.remote())["refused"]
    with pytest.raises(EnvelopeError) as on_channel:
        direct.forward(bad, THETA)
    with pytest.raises(EnvelopeError) as on_ray:
        over_ray.forward(bad, THETA)
    assert str(on_channel.value) == str(on_ray.value) and "exact#0" in str(on_channel.value)
    assert ray.get(h.stats.remote())["refused"] == refused + 2 and direct.retried == 0
    holder = DeviceClient("exact", client_id="holder").connect()
    lease = holder.lease(30)
    try:
        with pytest.raises(DeviceLeasedError, match="holder"):
            direct.forward(_x(2), THETA)
        assert holder.forward(_x(2), THETA).shape == (2, N)  # the holder's own requests go through
    finally:
        lease.release()
    assert direct.retried == 0 and direct.forward(_x(2), THETA).shape == (2, N)  # the link survived


def test_the_channel_listens_on_loopback_and_serves_only_the_secret_holder(exact):
    (h,) = exact
    info = ray.get(h.channel.remote())
    assert info["host"] == "127.0.0.1" and info["node_id"] == ray.get_runtime_context().get_node_id()
    pid = ray.get(h.info.remote())["pid"]
    bound = {ip for ip, port, _ in listening_sockets([pid]) if port == info["port"]}
    assert bound == {"127.0.0.1"}  # as the kernel reports the actor's listening socket
    requests = ray.get(h.stats.remote())["requests"]
    forward = P.encode_frame(P.FORWARD, {"rows": 1, "cols": N, "n_theta": THETA.size, "client": "intruder"},
                             _x(1).tobytes() + THETA.tobytes())
    for opening in (P.encode_frame(P.HELLO, {"secret": "0" * 32}), forward):  # a wrong secret; none at all
        with _raw(info) as sock:
            sock.sendall(opening)
            ftype, header, _ = P.read_frame(sock)
            assert ftype == P.ERROR and header["code"] == P.E_AUTH and "secret" in header["message"]
            assert sock.recv(1) == b""  # closed by the actor
    assert ray.get(h.stats.remote())["requests"] == requests  # nothing reached the device
    with _raw(info) as sock:  # the wire as documented: HELLO with the secret, then FORWARD
        sock.sendall(P.encode_frame(P.HELLO, {"secret": info["secret"]}))
        assert P.read_frame(sock)[0] == P.HELLO | P.REPLY
        sock.sendall(forward)
        ftype, header, payload = P.read_frame(sock)
        assert ftype == P.FORWARD | P.REPLY and (header["rows"], header["cols"]) == (1, N)
        assert np.isfinite(np.frombuffer(payload, "<f4")).all() and len(payload) == 4 * N
        sock.sendall(P.encode_frame(P.FORWARD, {"rows": 2, "cols": N, "n_theta": 1}, b"\0" * 12))
        ftype, header, _ = P.read_frame(sock)  # a payload that does not match its header
        assert ftype == P.ERROR and header["code"] == P.E_PROTOCOL and "12 bytes" in header["message"]
    assert ray.get(h.stats.remote())["requests"] == requests + 1


def test_a_device_configured_without_a_channel_is_served_over_ray(ray_session):
    (h,) = start_device(DeviceConfig(name="nochan", system={"kind": "oscillators", "n": N},
                                     local_channel=False))
    try:
        assert ray.get(h.channel.remote()) is None
        c = DeviceClient("nochan", client_id="c").connect()
        assert c.forward(_x(3), THETA).shape == (3, N) and c.channel_requests == 0
    finally:
        stop_device("nochan")


def test_a_caller_that_times_out_has_its_queued_request_dropped(slow):
    (h,) = slow
    busy = DeviceClient("lcslow", client_id="busy").connect()
    hasty = DeviceClient("lcslow", client_id="hasty", timeout_s=0.15).connect()
    first = busy.submit(_x(2), THETA)  # occupies the device for 0.6 s
    time.sleep(0.05)
    with pytest.raises(DeviceTimeoutError, match=r"device 'lcslow' \(lcslow#0\): no answer to forward within 0.15 s"):
        hasty.forward(_x(3), THETA)
    assert hasty.channel_requests == 1 and hasty.retried == 0
    first.result()
    time.sleep(2 * CANCEL_POLL_S + 0.5)
    stats = ray.get(h.stats.remote())
    assert "hasty" not in stats["clients"] or stats["clients"]["hasty"]["rows"] == 0  # never served
    assert stats["queued_requests"] == 0


def test_a_restarted_actor_is_reached_again_over_a_fresh_channel(slow):
    (h,) = slow
    c = DeviceClient("lcslow", client_id="survivor", retries=3, backoff_s=0.05).connect()
    assert c.forward(_x(1), THETA).shape == (1, N)
    old_port = ray.get(h.channel.remote())["port"]
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("y", c.forward(_x(2), THETA)))
    t.start()
    while not ray.get(h.stats.remote())["in_call"]:  # the second request is being measured
        time.sleep(0.01)
    ray.kill(h, no_restart=False)  # mid-request: the link breaks, the request goes again
    t.join(60)
    assert out["y"].shape == (2, N) and c.retried >= 1
    assert c.forward(_x(1), THETA).shape == (1, N)
    assert c.channel_requests >= 3 and ray.get(h.channel.remote())["port"] != old_port
    assert ray.get(h.info.remote())["restarted"]


# -- the server alone -------------------------------------------------------------------------------------
def test_a_closed_connection_cancels_its_waiting_request_and_a_served_one_is_answered():
    futures: list[Future] = []

    def submit(x, theta, client, token, user):
        futures.append(Future())
        futures[-1].meta = (x.copy(), theta.copy(), client, token, user)
        return futures[-1]

    server = ChannelServer(submit, "unit")
    port = server.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(P.encode_frame(P.HELLO, {"secret": server.secret}))
            assert P.read_frame(sock)[0] == P.HELLO | P.REPLY
            x = np.arange(6, dtype=np.float32).reshape(3, 2)
            sock.sendall(P.encode_frame(P.FORWARD, {"rows": 3, "cols": 2, "n_theta": 1, "client": "c",
                                                    "token": "t", "user": "u"}, x.tobytes() + b"\0\0\x80?"))
            _until(lambda: len(futures) == 1)
            got_x, got_theta, *who = futures[0].meta
            np.testing.assert_array_equal(got_x, x)
            assert got_theta.tolist() == [1.0] and who == ["c", "t", "u"]
            futures[0].set_result(got_x * 2)
            ftype, header, payload = P.read_frame(sock)
            assert ftype == P.FORWARD | P.REPLY
            np.testing.assert_array_equal(np.frombuffer(payload, "<f4").reshape(3, 2), x * 2)
            sock.sendall(P.encode_frame(P.FORWARD, {"rows": 1, "cols": 2, "n_theta": 0}, x[0].tobytes()))
            _until(lambda: len(futures) == 2)
        # the client closed while its second request waited: cancelled within one poll
        _until(lambda: futures[1].cancelled(), timeout_s=5 * CANCEL_POLL_S)
        _until(lambda: server.connections == 0)
    finally:
        server.close()
    # closing the channel ends its threads (a closed listener must wake the thread blocked in accept)
    _until(lambda: not [t for t in threading.enumerate() if t.name.startswith("channel-unit")])


def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
