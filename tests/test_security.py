"""Security defaults (README "Security defaults"): the servers physfarm starts listen on loopback only
unless told otherwise, and the Ray that `physfarm sweep` starts keeps token authentication on.

Each test runs the real thing: `physfarm ui` (a real MLflow UI process), the instrument server's real
socket, a real local Ray in a subprocess that another process then tries to join with a token of its own.
That the UI listens on 127.0.0.1 only is checked with the tracking server's tests
(tests/test_tracking_server.py), which already run one.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from actors.instrument.server import InstrumentServer
from bench.faults import free_port, listening_addresses

BIN = Path(sys.executable).parent


def test_instrument_server_binds_loopback_by_default():
    server = InstrumentServer({"kind": "oscillators", "n": 4}, port=0, log=lambda msg: None)
    host, port = server.start()
    try:
        assert host == "127.0.0.1"
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        server.stop()


def test_physfarm_ui_warns_when_told_to_listen_on_all_interfaces(tmp_path):
    port = free_port()
    proc = subprocess.Popen([str(BIN / "physfarm"), "ui", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                             "--port", str(port), "--host", "0.0.0.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stderr.readline()
        assert "warning: listening on 0.0.0.0" in line and "no login" in line
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


HEAD = textwrap.dedent("""
    import os, sys
    import ray
    from farm.sweep import init_ray
    init_ray(None)                      # what `physfarm sweep` does without --address
    print(os.environ.get("RAY_AUTH_MODE"), ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()                    # hold the cluster until the test is done
""")
JOIN = textwrap.dedent("""
    import sys, ray
    try:
        ray.init(address=sys.argv[1], log_to_driver=False)
        print("joined")
    except Exception as err:
        print("refused:", type(err).__name__, str(err)[:300])
""")


def test_sweep_ray_keeps_token_authentication_on(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # That Ray listens on 127.0.0.1 only; a plain ray.init joins it in Ray's single-machine mode (else
    # it rewrites 127.0.0.1 into the machine's network address, where nothing listens).
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["HOME"] = str(tmp_path)  # the token Ray generates goes to $HOME/.ray/auth_token: a fresh one
    head = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parent.parent)
    try:
        line = head.stdout.readline().split()
        assert line, head.stderr.read()[-3000:] if head.poll() is not None else "no output from the head"
        mode, gcs = line
        assert mode == "token", f"RAY_AUTH_MODE in the sweep's process is {mode!r}: token auth was switched off"
        assert (tmp_path / ".ray" / "auth_token").is_file()
        # Another user's process (its own, wrong token) is refused; one holding the token joins.
        other = {**env, "HOME": str(tmp_path / "other"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x" * 32}
        out = subprocess.run([sys.executable, "-c", JOIN, gcs], capture_output=True, text=True, env=other,
                             timeout=120).stdout
        assert out.startswith("refused:"), out
        mine = {**env, "RAY_AUTH_MODE": "token"}
        out = subprocess.run([sys.executable, "-c", JOIN, gcs], capture_output=True, text=True, env=mine,
                             timeout=120).stdout
        assert out.strip() == "joined", out
    finally:
        head.stdin.close()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
