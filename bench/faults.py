"""`FaultProxy`: a loopback TCP proxy that injects network faults between a client and a server.

Used by the chaos bench (bench/chaos.py) and the instrument tests to make a real instrument server
look hung or flaky without touching the server:

    proxy = FaultProxy(("127.0.0.1", server_port)).start()   # clients connect to proxy.port
    proxy.hang()     # connections stay open and are accepted, but nothing is forwarded either way
    proxy.drop()     # every open connection is closed; new ones are accepted and closed at once
    proxy.resume()   # forward again (new connections reach the server)
    proxy.drop_open()  # close the open connections once, keep forwarding new ones

Bytes that arrive while hung are discarded (as a dead link would lose them), so a client waiting for
a reply times out instead of getting a late one.

Beside it, for the tests and benches that run real servers on loopback: `free_port`, `wait_healthy`
(an MLflow server's /health), `listening_addresses` (where a port is bound, from /proc/net), and
`MLflowServer` (a real `mlflow server` that can be crashed and brought back).
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

PASS, HANG, DROP = "pass", "hang", "drop"


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1", port: int = 0):
        self.upstream = upstream
        self.mode = PASS
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.2)  # wake regularly to notice close()
        self.host, self.port = self._listener.getsockname()[:2]
        self._pairs: set[tuple[socket.socket, socket.socket | None]] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.accepted = 0
        self.discarded_bytes = 0

    # -- control -------------------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name=f"fault-proxy-{self.port}")
        self._thread.start()
        return self

    def hang(self) -> None:
        self.mode = HANG

    def resume(self) -> None:
        self.mode = PASS

    def drop(self) -> None:
        self.mode = DROP
        self.drop_open()

    def drop_open(self) -> None:
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            _close(*pair)

    def close(self) -> None:
        self._closed.set()
        self.drop_open()
        try:
            self._listener.close()
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FaultProxy":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- forwarding ------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.mode == DROP:
                _close(client)
                continue
            upstream = None
            if self.mode == PASS:
                try:
                    upstream = socket.create_connection(self.upstream, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    _close(client)  # the server is down: the client sees the link close
                    continue
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(target=self._pump, args=(client, pair, True), daemon=True).start()
            if upstream is not None:
                threading.Thread(target=self._pump, args=(upstream, pair, False), daemon=True).start()

    def _pump(self, src: socket.socket, pair, from_client: bool) -> None:
        client, upstream = pair
        dst = upstream if from_client else client
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.mode != PASS or dst is None:  # hung (or accepted while hung): lost in transit
                    self.discarded_bytes += len(data)
                    continue
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._pairs.discard(pair)
        _close(client, upstream)


def _close(*socks) -> None:
    for s in socks:
        if s is None:
            continue
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            s.close()
        except OSError:
            pass


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, timeout_s: float = 120) -> None:
    """Wait until an MLflow server (`mlflow server`, `physfarm ui`) at `url` answers /health; raise if
    its process `proc` exits first or the time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy in {timeout_s} s")


def listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a socket in LISTEN state on `port` (from /proc/net/tcp*)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: TCP_LISTEN
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:  # four little-endian 32-bit words
                    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8))
                    found.add(socket.inet_ntop(socket.AF_INET6, raw))
    return found


def _proc_net_listeners() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every TCP socket in LISTEN state (/proc/net/tcp*)."""
    found = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A":  # TCP_LISTEN
                continue
            addr, hexport = local.split(":")
            if width == 8:
                ip = socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1])
            else:
                raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8))
                ip = socket.inet_ntop(socket.AF_INET6, raw)
            found[inode] = (ip, int(hexport, 16))
    return found


def process_tree(pid: int) -> set[int]:
    """`pid` and all its descendants alive now (from /proc/*/stat)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in tree:
            tree.add(p)
            todo.extend(parents.get(p, []))
    return tree


def listening_sockets(pids) -> set[tuple[str, int, int]]:
    """(address, port, pid) of each TCP socket in LISTEN state held by one of `pids` (found through
    their file descriptors' socket inodes in /proc/PID/fd and /proc/net/tcp*)."""
    listeners = _proc_net_listeners()
    held = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in listeners:
                    held.add((*listeners[inode], pid))
    return held


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (::ffff:127.x.y.z)."""
    import ipaddress

    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class MLflowServer:
    """A real `mlflow server` on a loopback port with a SQLite backend (`db`) in `root`, for crashing
    and bringing back: kill() SIGKILLs its whole process group (its workers too: a crash, not a clean
    shutdown) and waits until the port is closed; start() (again) serves the same store on the same
    port. Used by the tracking-fault tests and the chaos bench."""

    def __init__(self, root, mlflow: str | None = None):
        import sys

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.mlflow = mlflow or str(Path(sys.executable).parent / "mlflow")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = self.root / "backend.db"
        self.backend = f"sqlite:///{self.db}"
        self.proc = None

    def start(self, timeout_s: float = 180) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [self.mlflow, "server", "--backend-store-uri", self.backend, "--artifacts-destination",
             str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_healthy(self.url, self.proc, timeout_s)

    def kill(self, timeout_s: float = 60) -> None:
        import signal
        import time

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # its workers (same group) are gone once the port is free
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"port {self.port} still answers {timeout_s} s after the server was killed")
