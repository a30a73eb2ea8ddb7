"""The network instrument: protocol, client and server over real loopback sockets."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from actors.device_actor import DeviceActor
from actors.errors import DeviceError, EnvelopeError
from actors.instrument import protocol as P
from actors.instrument.client import Instrument
from actors.instrument.server import InstrumentServer, run_from_args, system_config_from_args
from actors.systems.registry import build_system
from bench.faults import free_port

REPO = Path(__file__).resolve().parents[1]
OSC = {"kind": "oscillators", "n": 10}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rand(spec, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = spec.input_range
    plo, phi = spec.param_range
    return lo + (hi - lo) * torch.rand(rows, spec.n_inputs, generator=g), \
        plo + (phi - plo) * torch.rand(spec.n_params, generator=g)


def _wait_closed_by_peer(inst: Instrument, timeout_s: float = 10.0) -> None:
    """Wait until the instrument's idle link has seen the peer's close (its socket turns readable:
    EOF), the condition under which the instrument reopens the link before its next request."""
    readable, _, _ = select.select([inst._sock], [], [], timeout_s)
    assert readable, f"the dropped link never reached the instrument's socket within {timeout_s:g} s"


def raw_connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def test_identify_spec_and_forward_match_the_local_simulator(serve):
    cfg = {"kind": "shg", "seed": 3}
    _, port = serve(cfg)
    inst = Instrument(port=port)
    assert inst._sock is None  # the constructor did no I/O
    inst.connect()
    assert inst.identity["server"] == "physfarm-instrument" and inst.identity["device"] == "shg"
    assert inst.identity["protocol"] == P.VERSION
    local = build_system(cfg)
    assert inst.spec == local.spec
    x, theta = rand(local.spec, 20)
    assert torch.equal(inst.forward(x, theta), local.forward(x, theta))  # same seed, same calls
    thetas = torch.rand(20, local.spec.n_params)
    assert torch.equal(inst.forward(x, thetas), local.forward(x, thetas))  # one theta per row
    big = inst.forward(torch.rand(600, 48), theta)  # > max_rows: sent as three requests
    assert big.shape == (600, 64) and big.dtype == torch.float32
    inst.close()


def test_shared_token(serve):
    _, port = serve(OSC, token="s3cret")
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=rf"instrument 127.0.0.1:{port}: .*refused.*token"):
        Instrument(port=port, backoff_s=1.0).connect()
    assert time.monotonic() - t0 < 0.9  # a wrong token is not retried
    with pytest.raises(DeviceError, match="token"):
        Instrument(port=port, token="wrong").connect()
    inst = Instrument(port=port, token="s3cret")
    x, theta = rand(inst.spec, 3)
    assert inst.forward(x, theta).shape == (3, 10)


def _start_subprocess_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors.instrument.server", "--system", "oscillators", "--port", str(port),
         "--set", "n=10", "--set", "noise=0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if "serving" in line:
                return proc
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise RuntimeError(f"instrument server did not start: {proc.stdout.read()}")


def test_server_killed_gives_device_error_and_restart_reconnects():
    port = free_port()
    proc = _start_subprocess_server(port)
    try:
        inst = Instrument(port=port, retries=2, backoff_s=0.05)
        x, theta = rand(inst.spec, 4)
        before = inst.forward(x, theta)
        proc.kill()
        proc.wait(timeout=10)
        with pytest.raises(DeviceError, match=rf"instrument 127.0.0.1:{port}: cannot connect after 3 attempts"):
            inst.forward(x, theta)
        proc = _start_subprocess_server(port)
        after = inst.forward(x, theta)  # the client notices the dead link and reconnects by itself
        assert torch.equal(before, after)  # noise-free, drift-free oscillators: same physics
        assert inst.reconnects >= 1
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_connection_dropped_mid_call_is_a_device_error(serve):
    server, port = serve({**OSC, "latency_call_s": 1.0})
    inst = Instrument(port=port)
    x, theta = rand(inst.spec, 2)
    threading.Timer(0.3, server.stop).start()
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=rf"instrument 127.0.0.1:{port}: connection (dropped|lost) .*FORWARD"):
        inst.forward(x, theta)
    assert time.monotonic() - t0 < 5


def test_read_timeout_then_recovers(serve):
    _, port = serve({**OSC, "latency_call_s": 0.5})
    inst = Instrument(port=port, read_timeout_s=0.1)
    x, theta = rand(inst.spec, 2)
    with pytest.raises(DeviceError, match=r"no reply to FORWARD within 0.1 s"):
        inst.forward(x, theta)
    inst.config.read_timeout_s = 5.0
    assert inst.forward(x, theta).shape == (2, 10)  # a fresh link; the old reply is never misread


def _reply(sock) -> tuple[int, dict, bytes]:
    return P.read_frame(sock)


def test_malformed_frames_refused_without_crashing_the_server(serve):
    server, port = serve(OSC)
    # Not our protocol at all: an ERROR frame, then the server hangs up.
    with raw_connect(port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        ftype, head, _ = _reply(s)
        assert ftype == P.ERROR and head["code"] == P.E_PROTOCOL and "bad magic" in head["message"]
        try:
            assert s.recv(1) == b""  # hung up (a reset if our unread bytes were still queued)
        except ConnectionResetError:
            pass
    # A frame claiming 2 GiB: refused from its prefix, never read.
    with raw_connect(port) as s:
        s.sendall(P.PREFIX.pack(P.MAGIC, P.VERSION, P.HELLO, 0, 2, 2**31) + b"{}")
        ftype, head, _ = _reply(s)
        assert ftype == P.ERROR and "exceeds the maximum" in head["message"]
    # Bad JSON in the header.
    with raw_connect(port) as s:
        s.sendall(P.PREFIX.pack(P.MAGIC, P.VERSION, P.HELLO, 0, 5, 0) + b"{oops")
        ftype, head, _ = _reply(s)
        assert ftype == P.ERROR and "JSON" in head["message"]
    # A request before HELLO.
    with raw_connect(port) as s:
        s.sendall(P.encode_frame(P.SPEC, {"id": 1}))
        ftype, head, _ = _reply(s)
        assert ftype == P.ERROR and head["code"] == P.E_AUTH
    # Well framed but wrong content: answered, and the connection stays usable.
    with raw_connect(port) as s:
        s.sendall(P.encode_frame(P.HELLO, {"id": 1}))
        assert _reply(s)[0] == P.HELLO | P.REPLY
        s.sendall(P.encode_frame(P.FORWARD, {"id": 2, "rows": 2, "n_inputs": 10, "n_params": 110}, b"\0" * 12))
        ftype, head, _ = _reply(s)
        assert ftype == P.ERROR and head["code"] == P.E_PROTOCOL and "payload has 12 bytes" in head["message"]
        assert head["id"] == 2
        s.sendall(P.encode_frame(P.FORWARD, {"id": 3, "rows": 1, "n_inputs": 10, "n_params": 110},
                                 (torch.full((120,), 5.0).numpy().astype("<f4")).tobytes()))
        ftype, head, _ = _reply(s)
        assert ftype == P.ERROR and head["code"] == P.E_ENVELOPE and "outside the input range" in head["message"]
        s.sendall(P.encode_frame(0x33, {"id": 4}))
        ftype, head, _ = _reply(s)
        assert ftype == P.ERROR and "unknown request type" in head["message"]
        s.sendall(P.encode_frame(P.SPEC, {"id": 5}))
        ftype, head, _ = _reply(s)
        assert ftype == P.SPEC | P.REPLY and head["spec"]["n_outputs"] == 10 and head["id"] == 5
    # After all that, a normal client is served.
    inst = Instrument(port=port)
    x, theta = rand(inst.spec, 3)
    assert torch.isfinite(inst.forward(x, theta)).all()
    assert server.errors >= 7


def test_device_fault_and_refusals_map_to_client_errors(serve):
    _, port = serve({**OSC, "fault_rate": 1.0})
    inst = Instrument(port=port)
    x, theta = rand(inst.spec, 2)
    with pytest.raises(DeviceError, match=rf"instrument 127.0.0.1:{port}: server reported a device error"):
        inst.forward(x, theta)
    # Refused locally before anything is sent...
    with pytest.raises(EnvelopeError, match="outside the input range"):
        inst.forward(x + 5, theta)
    # ...and by the server if it gets there (a client that skipped the check).
    with pytest.raises(EnvelopeError, match="refused by the server"):
        inst._forward_chunk((x + 5).numpy(), theta.numpy())


def test_malformed_reply_is_a_device_error():
    """A server that answers garbage: the client names the instrument and what was wrong."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def bad_server():
        conn, _ = listener.accept()
        P.read_frame(conn)  # HELLO
        conn.sendall(b"\xde\xad\xbe\xef" * 8)

    t = threading.Thread(target=bad_server, daemon=True)
    t.start()
    with pytest.raises(DeviceError, match=rf"instrument 127.0.0.1:{port}: .*malformed reply to HELLO: bad magic"):
        Instrument(port=port, retries=0).connect()
    listener.close()


def test_spec_before_connect_and_changed_spec(serve):
    _, port = serve(OSC)
    spec = build_system(OSC).spec
    inst = Instrument(port=port, expect_spec=spec.model_dump())
    assert inst.spec == spec and inst._sock is None  # answered without I/O
    x, theta = rand(spec, 2)
    assert inst.forward(x, theta).shape == (2, 10)
    wrong = {**spec.model_dump(), "n_outputs": 9}
    with pytest.raises(DeviceError, match="spec changed"):
        Instrument(port=port, expect_spec=wrong).connect()


def test_reset_restores_the_initial_device(serve):
    _, port = serve({**OSC, "drift": 10.0, "noise": 0})
    inst = Instrument(port=port)
    x, theta = rand(inst.spec, 3)
    first = inst.forward(x, theta)
    for _ in range(20):
        inst.forward(x, theta)
    assert not torch.equal(inst.forward(x, theta), first)  # drifted
    inst.reset()
    assert torch.equal(inst.forward(x, theta), first)


def test_ideal_model_from_twin_or_a_clear_error():
    with pytest.raises(NotImplementedError, match="no ideal model.*twin_system"):
        Instrument(port=1).ideal_model()
    model = Instrument(port=1, twin_system=OSC).ideal_model()
    assert isinstance(model, torch.nn.Module)


def test_device_actor_serves_an_instrument(serve):
    _, port = serve({**OSC, "noise": 0})
    actor = DeviceActor({"kind": "instrument", "port": port}, name="remote-osc")
    x, theta = rand(build_system(OSC).spec, 5)

    async def go():
        return await asyncio.wrap_future(actor.submit(x.numpy(), theta.numpy(), client="t"))

    y = asyncio.run(go())
    assert y.shape == (5, 10)
    assert actor.stats()["calls"] == 1


def test_cli_parses_and_refuses_bad_configs(capsys):
    from farm.instrument_cli import add_instrument_parser, cmd_instrument_serve

    parser = argparse.ArgumentParser(prog="physfarm")
    add_instrument_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["instrument", "serve", "--system", "shg", "--port", "6000",
                              "--set", "noise=0", "--set", "n_outputs=16"])
    assert args.func is cmd_instrument_serve and args.host == "127.0.0.1" and args.port == 6000
    assert system_config_from_args(args.system, args.config, args.sets) == {"kind": "shg", "noise": 0, "n_outputs": 16}
    bad = parser.parse_args(["instrument", "serve", "--system", "shg", "--set", "n_outputs=many"])
    assert run_from_args(bad) == 2
    assert "n_outputs" in capsys.readouterr().err
    assert run_from_args(parser.parse_args(["instrument", "serve", "--system", "nope"])) == 2


def test_protocol_frame_round_trip():
    frame = P.encode_frame(P.FORWARD, {"id": 9, "rows": 1}, b"\x00\x00\x80\x3f")
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame)
        ftype, head, payload = P.read_frame(b)
    assert ftype == P.FORWARD and head == {"id": 9, "rows": 1} and payload == b"\x00\x00\x80\x3f"
    assert P.type_name(P.FORWARD | P.REPLY) == "FORWARD_REPLY"
    assert json.loads(frame[P.PREFIX.size : P.PREFIX.size + P.PREFIX.unpack(frame[:16])[4]]) == head


# -- fuzzed frames, a hung server, dropped links ---------------------------------------------------------
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
_ODD_NUMBERS = st.sampled_from([math.inf, -math.inf, math.nan, 1e300, 2.5, "3", 2**64, -2**63])
_FORWARD_KEYS = st.fixed_dictionaries({}, optional={
    "id": _JSON, "rows": st.one_of(st.integers(-3, 300), _ODD_NUMBERS, _JSON), "n_inputs": st.one_of(st.just(10), _JSON),
    "n_params": st.one_of(st.just(110), _JSON), "theta_rows": st.one_of(st.integers(-1, 3), _ODD_NUMBERS, _JSON)})


def _header_bytes(header) -> bytes:
    # allow_nan: Python's json writes NaN/Infinity, which a sloppy client might send too.
    return json.dumps(header, allow_nan=True).encode()


@st.composite
def hostile_streams(draw) -> list[bytes]:
    """Byte streams a broken or hostile client might send: garbage, random prefixes, oversized or
    truncated frames, well-framed requests with random headers and payloads, in sequence."""
    kinds = st.sampled_from(["garbage", "prefix", "oversize", "truncated", "request", "hello"])
    chunks = []
    for kind in draw(st.lists(kinds, min_size=1, max_size=4)):
        if kind == "garbage":
            chunks.append(draw(st.binary(max_size=64)))
        elif kind == "prefix":  # magic right, the rest random
            chunks.append(P.MAGIC + draw(st.binary(min_size=12, max_size=12)) + draw(st.binary(max_size=32)))
        elif kind == "oversize":
            hlen = draw(st.sampled_from([P.MAX_HEADER_BYTES + 1, 2**32 - 1, 10]))
            plen = draw(st.sampled_from([2**32 - 1, 2**31, P.DEFAULT_MAX_FRAME_BYTES]))
            chunks.append(P.PREFIX.pack(P.MAGIC, P.VERSION, draw(st.integers(0, 255)), 0, hlen, plen))
        elif kind == "truncated":
            frame = P.encode_frame(P.FORWARD, {"id": 1, "rows": 1, "n_inputs": 10, "n_params": 110}, b"\0" * 480)
            chunks.append(frame[: draw(st.integers(1, len(frame) - 1))])
        elif kind == "hello":
            chunks.append(P.PREFIX.pack(P.MAGIC, P.VERSION, P.HELLO, 0, 0, 0)[:16] if draw(st.booleans()) else
                          _frame(P.HELLO, {"id": 0, "token": draw(st.one_of(st.text(max_size=8), _JSON))}))
        else:
            ftype = draw(st.sampled_from([P.FORWARD, P.FORWARD, P.SPEC, P.RESET, P.ERROR, 0x00, 0x83, 0xFF]))
            header = draw(st.one_of(_FORWARD_KEYS, _JSON))
            chunks.append(_frame(ftype, header, draw(st.binary(max_size=600))))
    return chunks


def _frame(ftype: int, header, payload: bytes = b"") -> bytes:
    head = _header_bytes(header)
    return P.PREFIX.pack(P.MAGIC, P.VERSION, ftype, 0, len(head), len(payload)) + head + payload


def _replies(sock: socket.socket) -> list[tuple[int, dict]]:
    """Every frame the server sends until it closes the link or stays quiet for 2 s (generous: the
    suite's other tests load both cores; a refusal closes the link, so most streams end sooner)."""
    out = []
    sock.settimeout(2.0)
    try:
        while True:
            ftype, head, _ = P.read_frame(sock)
            out.append((ftype, head))
    except (P.ConnectionClosed, socket.timeout, ConnectionResetError):
        pass
    return out


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_fuzzed_frames_never_crash_the_server(token):
    server = InstrumentServer({**OSC, "noise": 0}, port=0, token=token, log=lambda msg: None,
                              max_frame_bytes=1 << 20)
    _, port = server.start()
    good = Instrument(port=port, token=token, read_timeout_s=10)
    x, theta = rand(good.spec, 3)
    reference = good.forward(x, theta)
    codes = set()

    # The two explicit examples make sure every run reaches both refusal paths (a framing error and a
    # request before HELLO); the 60 drawn ones vary from run to run and might miss one of them.
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(stream=hostile_streams(), hello_first=st.booleans(), half_close=st.booleans())
    @example(stream=[b"NOT A FRAME" * 2], hello_first=False, half_close=False)
    @example(stream=[_frame(P.SPEC, {"id": 1})], hello_first=False, half_close=False)
    def fuzz(stream, hello_first, half_close):
        with raw_connect(port) as s:
            if hello_first:
                s.sendall(P.encode_frame(P.HELLO, {"id": 0, **({"token": token} if token else {})}))
                assert P.read_frame(s)[0] == P.HELLO | P.REPLY
            try:
                for chunk in stream:
                    s.sendall(chunk)
                if half_close:
                    s.shutdown(socket.SHUT_WR)  # EOF right after (possibly inside) a frame
            except OSError:  # broken pipe, reset, not connected
                pass  # the server already hung up on an earlier framing error
            for ftype, head in _replies(s):
                # Every answer is a well-formed frame; a refusal names its cause, never "internal".
                assert ftype == P.ERROR or ftype & P.REPLY, ftype
                if ftype == P.ERROR:
                    assert head["code"] in (P.E_PROTOCOL, P.E_AUTH, P.E_ENVELOPE, P.E_DEVICE), head
                    assert head["message"], head
                    codes.add(head["code"])
        # The good client, on its own open connection, is still served the same measurement.
        assert torch.equal(good.forward(x, theta), reference)

    try:
        fuzz()
        assert server._thread.is_alive()
        assert {P.E_PROTOCOL, P.E_AUTH} <= codes  # the fuzz reached both refusal paths
    finally:
        good.close()
        server.stop()


def test_hung_server_times_out_naming_the_instrument_then_reconnects(serve, fault_proxy):
    _, port = serve({**OSC, "noise": 0})
    proxy = fault_proxy(port)
    inst = Instrument(port=proxy.port, read_timeout_s=0.3, retries=1, backoff_s=0.05)
    x, theta = rand(inst.spec, 4)
    before = inst.forward(x, theta)
    proxy.hang()  # the link stays up, nothing comes back
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=rf"instrument 127.0.0.1:{proxy.port}: no reply to FORWARD within 0.3 s"):
        inst.forward(x, theta)
    assert 0.25 < time.monotonic() - t0 < 2.0  # the configured timeout, not longer
    # Reconnecting while it still hangs: every attempt times out on HELLO, then one clear error.
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=rf"instrument 127.0.0.1:{proxy.port}: cannot connect after 2 attempts: "
                                          r".*no reply to HELLO within 0.3 s"):
        inst.forward(x, theta)
    assert time.monotonic() - t0 < 3.0  # (retries + 1) x read_timeout_s + backoff
    proxy.resume()
    assert torch.equal(inst.forward(x, theta), before)  # a fresh link; no stale reply misread
    assert inst.reconnects >= 1


def test_dropped_links_reconnect(serve, fault_proxy):
    _, port = serve({**OSC, "noise": 0})
    proxy = fault_proxy(port)
    inst = Instrument(port=proxy.port, read_timeout_s=5, retries=2, backoff_s=0.05)
    x, theta = rand(inst.spec, 4)
    before = inst.forward(x, theta)
    for _ in range(3):  # the link dropped while idle: noticed before the next request, reopened
        proxy.drop_open()
        _wait_closed_by_peer(inst)
        assert torch.equal(inst.forward(x, theta), before)
    assert inst.reconnects >= 3
    proxy.drop()  # every connection is cut at once: a clear error after the retries
    with pytest.raises(DeviceError, match=rf"instrument 127.0.0.1:{proxy.port}: cannot connect after 3 attempts"):
        inst.forward(x, theta)
    proxy.resume()
    assert torch.equal(inst.forward(x, theta), before)


def test_fuzz_findings_stay_fixed(serve):
    """Two inputs the frame fuzz found: a non-ASCII token (compare_digest raised, the connection died
    unanswered) and a JSON Infinity in 'rows' (answered as an internal error)."""
    _, port = serve(OSC, token="s3cret")
    with raw_connect(port) as s:
        s.sendall(P.encode_frame(P.HELLO, {"id": 1, "token": "sécret"}))
        ftype, head, _ = _reply(s)
        assert ftype == P.ERROR and head["code"] == P.E_AUTH
    with raw_connect(port) as s:
        s.sendall(P.encode_frame(P.HELLO, {"id": 1, "token": "s3cret"}))
        assert _reply(s)[0] == P.HELLO | P.REPLY
        s.sendall(_frame(P.FORWARD, {"id": 2, "rows": math.inf, "n_inputs": 10, "n_params": 110}))
        ftype, head, _ = _reply(s)
        assert ftype == P.ERROR and head["code"] == P.E_PROTOCOL and "integer 'rows'" in head["message"]
