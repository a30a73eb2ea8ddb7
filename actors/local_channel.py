"""The local channel: a device actor's forward requests over a loopback socket, beside Ray.

Why: on these 2-core machines a Ray actor call costs ~2.4 ms round trip for a 256 x 64 float32
request (Ray's own ping 1.5 ms), while the same request over a loopback TCP socket into the actor's
process costs ~0.35 ms (measured side by side, issue 19). A trainer on the device actor's node sends
its forward requests here; everything else (stats, leases, spec, control) and every trainer on
another node keeps using Ray. Requests enter the actor through the same `submit` as Ray's `serve`:
the same envelope check, admission, fair queue, accounting and audit.

Security: the server listens on 127.0.0.1 only (a port the OS picks) and a connection must open with
a HELLO carrying the actor's secret, which is handed out only over Ray (`DeviceActor.channel()`).
Nothing read from the socket is unpickled: errors travel as a class name and a message.

Frames are the instrument protocol's (actors/instrument/protocol.py: prefix, JSON header, float32
payload). On one connection, one request at a time:

    HELLO   {"secret"}                                   -> HELLO reply {} (or ERROR auth, closed)
    FORWARD {"rows", "cols", "n_theta", "client", "token", "user"}, payload x[rows, cols] then theta
            -> FORWARD reply {"rows", "cols"}, payload y[rows, cols]
            or ERROR {"code": "device", "error": class name, "message"}

A connection closed while its request waits cancels the request (the fair queue drops it unserved),
as `ray.cancel` does on Ray's path; it is noticed within `CANCEL_POLL_S`.
"""
from __future__ import annotations

import hmac
import secrets
import select
import socket
import threading
from concurrent.futures import CancelledError, Future
from typing import Callable

import numpy as np

from .errors import DeviceError, EnvelopeError
from .instrument import protocol as P

__all__ = ["ChannelServer", "CANCEL_POLL_S", "MAX_FRAME_BYTES", "HELLO_TIMEOUT_S"]

CANCEL_POLL_S = 0.25  # how often a waiting request checks that its connection is still open
HELLO_TIMEOUT_S = 10.0  # a connection that does not authenticate within this is closed
MAX_FRAME_BYTES = 1 << 30  # 1 GiB: larger requests go over Ray (the client checks before sending)

# submit(x[rows, cols] float32, theta[n] float32, client, lease_token, user) -> Future of y
Submit = Callable[..., Future]


class ChannelServer:
    """Serve forward requests of authenticated loopback connections into `submit`. Construct (no I/O),
    then `start()`; `close()` stops accepting and closes every connection."""

    def __init__(self, submit: Submit, name: str, host: str = "127.0.0.1"):
        self._submit = submit
        self.name = name
        self.host = host
        self.secret = secrets.token_hex(16)
        self.port: int | None = None
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> int:
        """Bind, listen and start accepting; returns the port."""
        if self._listener is not None:
            return self.port
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        sock.listen(64)
        self._listener, self.port = sock, sock.getsockname()[1]
        threading.Thread(target=self._accept, args=(sock,), name=f"channel-{self.name}", daemon=True).start()
        return self.port

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in ([self._listener] if self._listener else []) + conns:
            _close(s)

    @property
    def connections(self) -> int:
        """Open connections (authenticated or not yet)."""
        with self._lock:
            return len(self._conns)

    # -- accepting ------------------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name=f"channel-{self.name}-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self._hello(conn):
                while not self._closed and self._one_request(conn):
                    pass
        except (OSError, P.ConnectionClosed, P.ProtocolError):
            pass  # the peer went away or spoke nonsense: drop the connection
        finally:
            with self._lock:
                self._conns.discard(conn)
            _close(conn)

    def _hello(self, conn: socket.socket) -> bool:
        conn.settimeout(HELLO_TIMEOUT_S)
        ftype, header, _ = P.read_frame(conn, 64 * 1024)
        given = header.get("secret")
        if ftype != P.HELLO or not isinstance(given, str) or not hmac.compare_digest(given, self.secret):
            conn.sendall(P.error_frame(P.E_AUTH, f"device '{self.name}': open the local channel with HELLO "
                                                 "and the secret from DeviceActor.channel()"))
            return False
        conn.settimeout(None)
        conn.sendall(P.encode_frame(P.HELLO | P.REPLY, {}))
        return True

    def _one_request(self, conn: socket.socket) -> bool:
        """Serve one FORWARD; False when the connection is to be closed."""
        ftype, header, payload = P.read_frame(conn, MAX_FRAME_BYTES)
        if ftype != P.FORWARD:
            conn.sendall(P.error_frame(P.E_PROTOCOL, f"expected FORWARD, got {P.type_name(ftype)}"))
            return False
        try:
            rows, cols, n_theta = (int(header[k]) for k in ("rows", "cols", "n_theta"))
        except (KeyError, TypeError, ValueError):
            conn.sendall(P.error_frame(P.E_PROTOCOL, "FORWARD header needs integer rows, cols and n_theta"))
            return False
        if min(rows, cols, n_theta) < 0 or len(payload) != 4 * (rows * cols + n_theta):
            conn.sendall(P.error_frame(P.E_PROTOCOL, f"FORWARD payload of {len(payload)} bytes does not "
                                                     f"hold x[{rows}, {cols}] and theta[{n_theta}] float32"))
            return False
        values = np.frombuffer(payload, dtype="<f4")
        x, theta = values[: rows * cols].reshape(rows, cols), values[rows * cols:]
        try:
            future = self._submit(x, theta, str(header.get("client") or "anonymous"), header.get("token"),
                                  header.get("user"))
            y = self._await(future, conn)
            if y is None:
                return False  # the caller gave up and closed: the request was cancelled
            y = np.ascontiguousarray(y, dtype="<f4")
            reply = P.encode_frame(P.FORWARD | P.REPLY, {"rows": int(y.shape[0]), "cols": int(y.shape[1])},
                                   y.tobytes())
        except (DeviceError, EnvelopeError, ValueError) as err:
            reply = _error(type(err).__name__, str(err))
        except CancelledError:
            return False
        except Exception as err:  # noqa: BLE001 - a bug in the actor: reported, never retried
            reply = _error("RuntimeError", f"{type(err).__name__}: {err}")
        conn.sendall(reply)
        return True

    @staticmethod
    def _await(future: Future, conn: socket.socket):
        """The future's result; None (and the request cancelled) when the peer closes meanwhile."""
        while True:
            try:
                return future.result(timeout=CANCEL_POLL_S)
            except TimeoutError:
                if _peer_closed(conn):
                    future.cancel()
                    return None


def _error(cls: str, message: str) -> bytes:
    return P.encode_frame(P.ERROR, {"code": P.E_DEVICE, "error": cls, "message": message})


def _peer_closed(conn: socket.socket) -> bool:
    """Whether the peer closed (EOF readable) without blocking. Early data (a protocol breach) is not EOF."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _close(sock: socket.socket) -> None:
    # shutdown first: on Linux a bare close() does not wake a thread blocked in accept() or recv() on
    # the same socket, which would stay blocked (a thread left behind per closed channel).
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # never connected, or already shut down
    try:
        sock.close()
    except OSError:
        pass
