"""`instrument`: a real device over the network, as a `PhysicalSystem` (PHYSICS.md section 7).

The client speaks the physfarm instrument protocol (actors/instrument/protocol.py,
docs/instrument-protocol.md) to a server on host:port: `physfarm instrument serve` for a simulator, or
a lab's control PC. The constructor does no I/O; `connect()` opens the link (HELLO, then SPEC), and
`spec` comes from the server (first access connects, unless `expect_spec` is configured).

Failures are `DeviceError`s naming the instrument (host:port) and what happened: refused or timed out
connections (after `retries` reconnect attempts with exponential backoff), a link dropped mid-call,
no reply within `read_timeout_s`, a malformed reply, or an error the server reports. Envelope refusals
(checked here before sending, and again by the server) are `EnvelopeError`s. A dropped link is
noticed before the next request and reopened, so a restarted server is picked up transparently.
Requests are not retried automatically: a measurement may have happened, the caller decides.

The instrument has no nominal physics of its own: `ideal_model()` returns the ideal model of
`twin_system` (a simulator config describing the same apparatus), or raises saying a learned twin is
needed.
"""
from __future__ import annotations

import select
import socket
import threading
import time

import numpy as np
import torch

from ..envelope import check_request
from ..errors import DeviceError, EnvelopeError
from ..spec import SystemSpec
from . import protocol as P
from .config import InstrumentConfig


class Instrument:
    """A network instrument (see module docstring)."""

    config_class = InstrumentConfig

    def __init__(self, config: InstrumentConfig | dict | None = None, **overrides):
        if config is None or isinstance(config, dict):
            config = InstrumentConfig.model_validate({**(config or {}), **overrides})
        elif overrides:
            config = InstrumentConfig.model_validate({**config.model_dump(), **overrides})
        self.config = config
        self.where = f"instrument {config.host}:{config.port}"
        self._sock: socket.socket | None = None
        self._spec: SystemSpec | None = None
        self._expected = SystemSpec(**config.expect_spec) if config.expect_spec else None
        self._lock = threading.RLock()
        self._next_id = 0
        self.identity: dict = {}
        self.info: dict = {}
        self.reconnects = 0

    # -- protocol ---------------------------------------------------------------------------------
    @property
    def spec(self) -> SystemSpec:
        if self._spec is not None:
            return self._spec
        if self._expected is not None:
            return self._expected
        self.connect()  # the spec lives on the server
        return self._spec

    def connect(self) -> None:
        """Open the link (with retries and backoff), identify, and fetch the spec."""
        with self._lock:
            if self._sock is not None and not self._stale():
                return
            self._drop()
            cfg = self.config
            delay, last = cfg.backoff_s, None
            for attempt in range(cfg.retries + 1):
                if attempt:
                    time.sleep(min(delay, cfg.backoff_max_s))
                    delay *= 2
                try:
                    self._open()
                    if attempt or self.identity:
                        self.reconnects += 1
                    return
                except _NoRetry:
                    self._drop()
                    raise
                except DeviceError as exc:
                    last = exc
                    self._drop()
            raise DeviceError(f"{self.where}: cannot connect after {cfg.retries + 1} attempts: {last}")

    def close(self) -> None:
        with self._lock:
            self._drop()

    def forward(self, x, theta) -> torch.Tensor:
        """Measure y[B, n_outputs]; requests larger than the device's max rows go as several calls."""
        spec = self.spec
        x_np, theta_np = check_request(spec, x, theta, device=self.where)
        rows, step = x_np.shape[0], spec.max_rows
        parts = []
        for i in range(0, rows, step):
            th = theta_np if theta_np.ndim == 1 else theta_np[i : i + step]
            parts.append(self._forward_chunk(np.ascontiguousarray(x_np[i : i + step]), np.ascontiguousarray(th)))
        y = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return torch.from_numpy(y)

    def reset(self) -> None:
        """Ask the server to bring the device back to its initial state."""
        self._request(P.RESET, {})

    def ideal_model(self) -> torch.nn.Module:
        if self.config.twin_system is None:
            raise NotImplementedError(
                f"{self.where} has no ideal model: a network instrument carries no nominal physics. Set "
                f"`twin_system` in its config to a simulator config of the same apparatus, or fit a "
                f"learned twin from its measurements (trainers' digital twin)")
        from ..systems.registry import build_system

        return build_system(self.config.twin_system).ideal_model()

    # -- internals --------------------------------------------------------------------------------
    def _forward_chunk(self, x: np.ndarray, theta: np.ndarray) -> np.ndarray:
        spec = self._spec or self.spec
        rows = x.shape[0]
        theta_rows = 1 if theta.ndim == 1 else theta.shape[0]
        header = {"rows": rows, "n_inputs": spec.n_inputs, "n_params": spec.n_params, "theta_rows": theta_rows}
        payload = x.astype("<f4").tobytes() + theta.astype("<f4").tobytes()
        rh, data = self._request(P.FORWARD, header, payload)
        n_out = spec.n_outputs
        if rh.get("rows") != rows or rh.get("n_outputs") != n_out or len(data) != 4 * rows * n_out:
            self.close()
            raise DeviceError(f"{self.where}: malformed FORWARD reply (header {rh}, {len(data)} payload "
                              f"bytes; expected {rows} rows x {n_out} outputs of float32)")
        y = np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(rows, n_out)
        if not np.isfinite(y).all():
            raise DeviceError(f"{self.where}: the instrument returned non-finite values")
        return y

    def _request(self, ftype: int, header: dict, payload: bytes = b"") -> tuple[dict, bytes]:
        with self._lock:
            if self._sock is None or self._stale():
                self.connect()
            return self._exchange(ftype, header, payload)

    def _exchange(self, ftype: int, header: dict, payload: bytes = b"") -> tuple[dict, bytes]:
        """Send one request and read its reply on the open socket; any link failure closes it."""
        self._next_id += 1
        rid = self._next_id
        name = P.type_name(ftype)
        sock = self._sock
        try:
            sock.sendall(P.encode_frame(ftype, {**header, "id": rid}, payload))
            sock.settimeout(self.config.read_timeout_s)
            rtype, rh, data = P.read_frame(sock, self.config.max_frame_bytes)
        except socket.timeout:
            self._drop()
            raise DeviceError(f"{self.where}: no reply to {name} within {self.config.read_timeout_s} s "
                              f"(read_timeout_s); the link was closed") from None
        except P.ConnectionClosed:
            self._drop()
            raise DeviceError(f"{self.where}: connection dropped by the server during {name}") from None
        except P.ProtocolError as exc:
            self._drop()
            raise DeviceError(f"{self.where}: malformed reply to {name}: {exc}") from None
        except OSError as exc:
            self._drop()
            raise DeviceError(f"{self.where}: connection lost during {name}: {exc}") from None
        if rtype == P.ERROR:
            code, msg = rh.get("code"), rh.get("message", "")
            if code in (P.E_PROTOCOL, P.E_AUTH):
                self._drop()  # the server hangs up after these
            if code == P.E_ENVELOPE:
                raise EnvelopeError(f"{self.where}: refused by the server: {msg}")
            if code == P.E_AUTH:
                raise _NoRetry(f"{self.where}: the server refused the connection ({code}): {msg}; check `token`")
            raise DeviceError(f"{self.where}: server reported a {code} error on {name}: {msg}")
        if rtype != (ftype | P.REPLY) or rh.get("id") != rid:
            self._drop()
            raise DeviceError(f"{self.where}: unexpected reply {P.type_name(rtype)} (id {rh.get('id')}) "
                              f"to {name} (id {rid}); the link was closed")
        return rh, data

    def _open(self) -> None:
        cfg = self.config
        try:
            sock = socket.create_connection((cfg.host, cfg.port), timeout=cfg.connect_timeout_s)
        except socket.timeout:
            raise DeviceError(f"{self.where}: connect timed out after {cfg.connect_timeout_s} s") from None
        except OSError as exc:
            raise DeviceError(f"{self.where}: cannot connect: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        hello = {"client": cfg.client_name, "protocol": P.VERSION}
        if cfg.token:
            hello["token"] = cfg.token
        self.identity = self._exchange(P.HELLO, hello)[0]
        rh, _ = self._exchange(P.SPEC, {})
        try:
            spec = SystemSpec(**rh["spec"])
        except Exception as exc:  # noqa: BLE001
            self._drop()
            raise DeviceError(f"{self.where}: the server sent an invalid spec ({exc})") from None
        known = self._spec or self._expected
        if known is not None and spec != known:
            self._drop()
            raise _NoRetry(f"{self.where}: spec changed: expected {known.model_dump()}, the server reports "
                              f"{spec.model_dump()}; fix expect_spec or restart with the old device")
        self._spec = spec
        self.info = {"identity": dict(self.identity), "reconnects": self.reconnects}

    def _stale(self) -> bool:
        """True if the idle link is readable: the peer closed it (EOF) or sent bytes nobody asked for;
        either way it cannot be trusted and is reopened."""
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


class _NoRetry(DeviceError):
    """A connection failure that reconnecting cannot fix (wrong token, a different device)."""


__all__ = ["Instrument", "InstrumentConfig"]
