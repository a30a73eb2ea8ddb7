"""A standalone instrument server: any physfarm system behind the instrument protocol.

`physfarm instrument serve --system shg --port 5555` (or `python -m actors.instrument.server ...`)
runs a simulator behind the same framed TCP protocol a lab's control PC would speak, so the whole
network path (timeouts, reconnects, errors) is real and testable. A lab replaces this file's
`_handle_*` side with its instrument's driver, or runs it unchanged with `--system mylab.mod:Class`.

Binds 127.0.0.1 unless told otherwise. With `token`, every connection must open with a HELLO
carrying it (compared in constant time); the token travels in clear, so on an untrusted network
tunnel the port (SSH, VPN). One device serves all connections, one request at a time.
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import socket
import sys
import threading
import traceback
from typing import Any, Callable

import yaml

from ..errors import DeviceError, EnvelopeError
from . import protocol as P

SERVER_NAME = "physfarm-instrument"
SERVER_VERSION = "1.0"


class InstrumentServer:
    """Serve one system over TCP. `start()` runs it in a background thread; `serve_forever()` blocks."""

    def __init__(self, system_config: dict | Any, host: str = "127.0.0.1", port: int = 5555,
                 token: str | None = None, max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES,
                 log: Callable[[str], None] | None = None):
        from ..systems.registry import build_system, validate_system_config

        if isinstance(system_config, dict) or hasattr(system_config, "model_dump"):
            self._config = validate_system_config(system_config)
            self.system = build_system(self._config)
        else:  # an already-built PhysicalSystem
            self._config, self.system = None, system_config
        self.host, self.port, self.token = host, port, token
        self.max_frame_bytes = max_frame_bytes
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._device_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.requests = 0
        self.errors = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            return self.host, self.port
        return self._listener.getsockname()[:2]

    def bind(self) -> tuple[str, int]:
        """Connect the device and open the listening socket (port 0 picks a free port)."""
        if self._listener is not None:
            return self.address
        if not _is_loopback(self.host) and not self.token:
            self._log(f"warning: serving on {self.host} without a token: anyone who can reach this port "
                      f"can drive the device; pass --token")
        self.system.connect()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(16)
        self._listener = sock
        return self.address

    def serve_forever(self) -> None:
        self.bind()
        listener = self._listener
        listener.settimeout(0.2)  # wake regularly: closing a socket does not interrupt accept() everywhere
        while not self._stopping.is_set():
            try:
                conn, peer = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break  # listener closed by stop()
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._conns_lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve_connection, args=(conn, peer), daemon=True,
                             name=f"instrument-conn-{peer}").start()

    def start(self) -> tuple[str, int]:
        """Bind, then serve in a daemon thread; returns the bound (host, port)."""
        addr = self.bind()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="instrument-server")
        self._thread.start()
        return addr

    def stop(self) -> None:
        """Stop accepting and drop every open connection (clients see the link go down)."""
        self._stopping.set()
        if self._listener is not None:
            for close in (lambda: self._listener.shutdown(socket.SHUT_RDWR), self._listener.close):
                try:
                    close()
                except OSError:
                    pass
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.system.close()
        except Exception:  # noqa: BLE001 - closing a broken device must not hide the stop
            pass

    # -- one connection ---------------------------------------------------------------------------
    def _serve_connection(self, conn: socket.socket, peer) -> None:
        hello = False
        try:
            while not self._stopping.is_set():
                try:
                    ftype, header, payload = P.read_frame(conn, self.max_frame_bytes)
                except P.ConnectionClosed:
                    return
                except P.ProtocolError as exc:
                    # The stream cannot be trusted after a framing error: say why, then hang up.
                    self.errors += 1
                    self._send(conn, P.error_frame(P.E_PROTOCOL, str(exc)))
                    return
                rid = header.get("id")
                if ftype == P.HELLO:
                    # Compared as UTF-8 bytes: compare_digest raises on non-ASCII str (a client's
                    # token may be any text), which would kill this connection without an answer.
                    given = str(header.get("token") or "").encode("utf-8", "surrogatepass")
                    if self.token and not hmac.compare_digest(given, self.token.encode("utf-8")):
                        self.errors += 1
                        self._send(conn, P.error_frame(P.E_AUTH, "wrong or missing token", rid))
                        return
                    hello = True
                    self._send(conn, P.encode_frame(P.HELLO | P.REPLY, self._identity(rid)))
                    continue
                if not hello:
                    self.errors += 1
                    self._send(conn, P.error_frame(
                        P.E_AUTH, f"{P.type_name(ftype)} before HELLO: open every connection with HELLO", rid))
                    return
                self._send(conn, self._dispatch(ftype, header, payload, rid))
        except OSError:
            return  # the client went away mid-reply
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _send(self, conn: socket.socket, frame: bytes) -> None:
        conn.sendall(frame)

    def _identity(self, rid) -> dict:
        spec = self.system.spec
        return {"id": rid, "server": SERVER_NAME, "version": SERVER_VERSION, "protocol": P.VERSION,
                "device": spec.name, "kind": getattr(self._config, "kind", type(self.system).__name__)}

    def _dispatch(self, ftype: int, header: dict, payload: bytes, rid) -> bytes:
        self.requests += 1
        try:
            if ftype == P.SPEC:
                return P.encode_frame(P.SPEC | P.REPLY, {"id": rid, "spec": self.system.spec.model_dump()})
            if ftype == P.FORWARD:
                return self._forward(header, payload, rid)
            if ftype == P.RESET:
                with self._device_lock:
                    self._reset()
                return P.encode_frame(P.RESET | P.REPLY, {"id": rid})
            self.errors += 1
            return P.error_frame(P.E_PROTOCOL, f"unknown request type 0x{ftype:02x}; expected one of "
                                 f"{[P.type_name(t) for t in P.REQUESTS]}", rid)
        except EnvelopeError as exc:
            self.errors += 1
            return P.error_frame(P.E_ENVELOPE, str(exc), rid)
        except DeviceError as exc:
            self.errors += 1
            return P.error_frame(P.E_DEVICE, str(exc), rid)
        except _BadRequest as exc:
            self.errors += 1
            return P.error_frame(P.E_PROTOCOL, str(exc), rid)
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            self.errors += 1
            self._log(f"instrument server: internal error: {traceback.format_exc()}")
            return P.error_frame(P.E_INTERNAL, f"{type(exc).__name__}: {exc}", rid)

    def _forward(self, header: dict, payload: bytes, rid) -> bytes:
        spec = self.system.spec
        try:
            rows, n_in, n_p = int(header["rows"]), int(header["n_inputs"]), int(header["n_params"])
            theta_rows = int(header.get("theta_rows", 1))
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: a JSON Infinity
            raise _BadRequest("FORWARD header needs integer 'rows', 'n_inputs', 'n_params' "
                              "(and optional 'theta_rows')") from None
        if n_in != spec.n_inputs or n_p != spec.n_params:
            raise EnvelopeError(f"device '{spec.name}' takes {spec.n_inputs} inputs and {spec.n_params} "
                                f"params per row, the request has {n_in} and {n_p}")
        if rows < 1 or rows > spec.max_rows:
            raise EnvelopeError(f"device '{spec.name}': {rows} rows in one request, allowed 1..{spec.max_rows}; "
                                f"split the request")
        if theta_rows not in (1, rows):
            raise _BadRequest(f"theta_rows must be 1 or rows ({rows}), got {theta_rows}")
        want = 4 * (rows * n_in + theta_rows * n_p)
        if len(payload) != want:
            raise _BadRequest(f"FORWARD payload has {len(payload)} bytes, expected {want} "
                              f"(float32: {rows}x{n_in} x then {theta_rows}x{n_p} theta)")
        import numpy as np  # here, not at the top: `physfarm --help` builds this module's parser
        import torch

        values = np.frombuffer(payload, dtype="<f4")
        x = torch.from_numpy(values[: rows * n_in].reshape(rows, n_in).astype(np.float32))
        theta = values[rows * n_in :].astype(np.float32)  # [n_p] or [rows * n_p]
        theta = torch.from_numpy(theta if theta_rows == 1 else theta.reshape(rows, n_p))
        with self._device_lock:
            y = self.system.forward(x, theta)
        y = (y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)).astype("<f4")
        if y.shape != (rows, spec.n_outputs):
            raise DeviceError(f"device returned shape {list(y.shape)}, expected [{rows}, {spec.n_outputs}]")
        return P.encode_frame(P.FORWARD | P.REPLY, {"id": rid, "rows": rows, "n_outputs": spec.n_outputs},
                              y.tobytes())

    def _reset(self) -> None:
        """Bring the device back to its initial state: a simulator is rebuilt from its config (drift,
        call count and random streams restart); a driver without a config is closed and reconnected."""
        if self._config is not None:
            from ..systems.registry import build_system

            old, self.system = self.system, build_system(self._config)
            old.close()
            self.system.connect()
        else:
            self.system.close()
            self.system.connect()


class _BadRequest(Exception):
    """A well-framed request whose content is malformed (answered with a protocol error, connection kept)."""


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(system_config: dict, host: str = "127.0.0.1", port: int = 5555, token: str | None = None,
          max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES, ready=None) -> None:
    """Serve `system_config` (any registry kind) until interrupted.

    ready: optional threading.Event (set once listening) or callable receiving the bound (host, port).
    """
    server = InstrumentServer(system_config, host, port, token, max_frame_bytes)
    addr = server.bind()
    print(f"physfarm instrument: serving '{server.system.spec.name}' on {addr[0]}:{addr[1]}", flush=True)
    if ready is not None:
        ready.set() if hasattr(ready, "set") else ready(addr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


# -- command line ------------------------------------------------------------------------------------
def parse_sets(items: list[str] | None) -> dict:
    """['noise=0', 'n_outputs=16'] -> {'noise': 0, 'n_outputs': 16} (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def system_config_from_args(system: str, config_path: str | None, sets: list[str] | None) -> dict:
    cfg: dict = {}
    if config_path:
        with open(config_path) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path}: a system config must be a mapping (kind: ..., field: value)")
        cfg.update(loaded["system"] if isinstance(loaded.get("system"), dict) else loaded)
    if system:
        cfg["kind"] = system
    if "kind" not in cfg:
        raise ValueError("give --system KIND (e.g. shg) or a --config file with a 'kind'")
    cfg.update(parse_sets(sets))
    return cfg


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None,
                        help="system kind to serve (oscillators, shg, plate, circuit, cavity, recorded, "
                             "or package.module:Class)")
    parser.add_argument("--config", default=None, help="YAML file with the system config (kind and fields)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=5555, help="TCP port (0 picks a free one)")
    parser.add_argument("--token", default=None, help="shared secret every client must send in HELLO")
    parser.add_argument("--max-frame-bytes", type=int, default=P.DEFAULT_MAX_FRAME_BYTES,
                        help="largest frame accepted (bytes)")
    parser.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                        help="override a system config field, e.g. --set noise=0 (repeatable)")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        cfg = system_config_from_args(args.system, args.config, args.sets)
        from ..systems.registry import validate_system_config

        validate_system_config(cfg)
    except Exception as exc:  # noqa: BLE001 - a bad config is a usage error with its message
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        serve(cfg, host=args.host, port=args.port, token=args.token, max_frame_bytes=args.max_frame_bytes)
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.instrument.server",
                                     description="Serve a physfarm system over the instrument protocol")
    add_serve_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
