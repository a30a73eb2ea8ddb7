"""`LocalChannels`: a client's loopback links to the device replicas on its own node.

A device actor serves forward requests over a loopback socket beside Ray (actors/local_channel.py:
~0.35 ms a 256 x 64 request here, against ~2.4 ms for a Ray call). This object finds, for each
replica, whether that channel is usable from this process (same Ray node, enabled), opens
authenticated connections to it and keeps the idle ones. One connection carries one request at a
time; requests in flight at once (threads, `submit`) each take their own.

Any failure of the link (the actor died or restarted, the port is gone) raises `ChannelLost`; the
retry policy treats it as the loss of the actor (farm/retry.py): wait for the replica, look it up
again, and send the request again, over a fresh channel. A replica without a channel (on another
node, configured off, or an actor started by an older physfarm) is served over Ray.

Owns its sockets and what it learnt of each replica's channel; reaches the replicas through their
public methods.
"""
from __future__ import annotations

import socket
import threading

import numpy as np
import ray

from actors.errors import (DeviceBusyError, DeviceError, DeviceLeasedError, EnvelopeError,
                           QuotaExceededError)
from actors.instrument import protocol as P
from actors.local_channel import MAX_FRAME_BYTES

from .replicas import Replicas

__all__ = ["LocalChannels", "ChannelCall", "ChannelLost"]

_IDLE_KEPT = 4  # idle connections kept per replica (more are closed when answered)
# Error classes an answer may name (nothing from the socket is unpickled): the device's own.
_ERRORS = {cls.__name__: cls for cls in (DeviceError, DeviceBusyError, DeviceLeasedError, QuotaExceededError,
                                         EnvelopeError, ValueError, RuntimeError)}


class ChannelLost(ConnectionError):
    """The local channel to a replica broke (its actor died, restarted or closed the link)."""


class LocalChannels:
    def __init__(self, replicas: Replicas, control_timeout_s: float = 30.0, enabled: bool = True):
        self._replicas = replicas
        self.control_timeout_s = control_timeout_s
        self.enabled = enabled
        self._lock = threading.Lock()
        self._where: dict[int, tuple[object, dict | None]] = {}  # replica -> (its handle, channel or None)
        self._idle: dict[int, list[socket.socket]] = {}
        self._node: str | None = None
        self.sent = 0  # requests sent over a channel (for tests and benches)

    def __getstate__(self):  # sockets stay in their process; a copy finds its own channels
        return {**self.__dict__, "_lock": None, "_where": {}, "_idle": {}, "_node": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def send(self, replica: int, x: np.ndarray, theta: np.ndarray, who: tuple) -> "ChannelCall | None":
        """Send a forward request to `replica` over its channel; None when it has none (use Ray)."""
        size = 4 * (x.size + theta.size)
        if not self.enabled or size > MAX_FRAME_BYTES - P.MAX_HEADER_BYTES or x.ndim != 2:
            return None
        sock = self._connection(replica)
        if sock is None:
            return None
        client, token, user = who
        frame = P.encode_frame(P.FORWARD, {"rows": int(x.shape[0]), "cols": int(x.shape[1]),
                                           "n_theta": int(theta.size), "client": client, "token": token,
                                           "user": user}, x.tobytes() + theta.tobytes())
        try:
            sock.sendall(frame)
        except OSError as err:
            self._lost(replica, sock)
            raise ChannelLost(f"local channel to replica {replica} closed: {err}") from None
        self.sent += 1
        return ChannelCall(self, replica, sock)

    def forget(self, replica: int) -> None:
        """Drop what is known of a replica's channel (its idle connections too)."""
        with self._lock:
            self._where.pop(replica, None)
            idle = self._idle.pop(replica, [])
        for s in idle:
            _close(s)

    def close(self) -> None:
        for replica in list(self._where):
            self.forget(replica)

    # -- connections ------------------------------------------------------------------------------------
    def _connection(self, replica: int) -> socket.socket | None:
        with self._lock:
            idle = self._idle.get(replica)
            if idle:
                return idle.pop()
        info = self._channel_of(replica)
        if info is None:
            return None
        try:
            sock = socket.create_connection((info["host"], info["port"]), timeout=self.control_timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(P.encode_frame(P.HELLO, {"secret": info["secret"]}))
            ftype, header, _ = P.read_frame(sock, 64 * 1024)
        except (OSError, P.ProtocolError, P.ConnectionClosed):
            self.forget(replica)  # the actor moved on (restarted, stopped): ask it again next time
            return None
        if ftype != P.HELLO | P.REPLY:  # not this actor's channel any more (its port reused): use Ray
            _close(sock)
            self.forget(replica)
            return None
        sock.settimeout(None)
        return sock

    def _channel_of(self, replica: int) -> dict | None:
        """The replica's channel (host, port, secret) if usable from here, asked once per actor handle."""
        handle = self._replicas.handle(replica)
        with self._lock:
            known = self._where.get(replica)
        if known is not None and known[0] is handle:
            return known[1]
        try:
            info = ray.get(handle.channel.remote(), timeout=self.control_timeout_s)
        except Exception:  # noqa: BLE001 - an older actor without channel(), or not answering: use Ray
            info = None
        if info is not None and info.get("node_id") != self._node_id():
            info = None  # the channel listens on loopback: only a client on the actor's node reaches it
        with self._lock:
            self._where[replica] = (handle, info)
        return info

    def _node_id(self) -> str | None:
        if self._node is None:
            self._node = ray.get_runtime_context().get_node_id()
        return self._node

    def _idle_again(self, replica: int, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(replica, [])
            if len(idle) < _IDLE_KEPT:
                idle.append(sock)
                return
        _close(sock)

    def _lost(self, replica: int, sock: socket.socket) -> None:
        _close(sock)
        self.forget(replica)


class ChannelCall:
    """A forward request in flight on one connection (`LocalChannels.send`)."""

    def __init__(self, channels: LocalChannels, replica: int, sock: socket.socket):
        self._channels, self._replica, self._sock = channels, replica, sock

    def result(self, timeout: float) -> np.ndarray:
        """y[rows, cols]; the device's error as raised by the actor; `TimeoutError` after `timeout` s
        (the request is then given up: the link is closed, so the actor drops it); `ChannelLost`."""
        sock, self._sock = self._sock, None
        if sock is None:
            raise RuntimeError("result() of a local-channel call taken twice")
        try:
            sock.settimeout(timeout)
            ftype, header, payload = P.read_frame(sock, MAX_FRAME_BYTES)
        except (TimeoutError, socket.timeout):
            _close(sock)  # the actor notices and cancels the request
            raise TimeoutError(f"no answer within {timeout:g} s") from None
        except (OSError, P.ProtocolError, P.ConnectionClosed) as err:
            self._channels._lost(self._replica, sock)
            raise ChannelLost(f"local channel to replica {self._replica} lost: {type(err).__name__}: {err}") from None
        if ftype == P.FORWARD | P.REPLY:
            sock.settimeout(None)
            self._channels._idle_again(self._replica, sock)
            y = np.frombuffer(payload, dtype="<f4")
            return y.reshape(int(header["rows"]), int(header["cols"]))
        if ftype == P.ERROR and header.get("code") == P.E_DEVICE:
            sock.settimeout(None)
            self._channels._idle_again(self._replica, sock)  # a refusal or a fault: the link is fine
            raise _ERRORS.get(header.get("error"), RuntimeError)(header.get("message", ""))
        self._channels._lost(self._replica, sock)
        raise ChannelLost(f"local channel to replica {self._replica}: {header.get('message', P.type_name(ftype))}")

    def cancel(self) -> None:
        """Give the request up: close its link (the actor drops the request if it is still queued)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
