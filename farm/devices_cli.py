"""`physfarm devices up|ls|down`: a standing device pool on a running Ray cluster (docs/pool.md)."""
from __future__ import annotations

import argparse
import json
import sys

from .raycluster import NoCluster

EXIT_NO_CLUSTER = 1


def connect(address: str = "auto") -> str:
    """Join an existing Ray cluster in the physfarm namespace (never starts one); returns its address.
    Token authentication is handled as the cluster needs it (farm/raycluster.py)."""
    from .raycluster import join

    return join(address)


def _fail(msg: str) -> int:
    print(f"physfarm: {msg}", file=sys.stderr)
    return EXIT_NO_CLUSTER


def cmd_up(args) -> int:
    from actors.errors import DeviceError

    from .pool import load_pool, start_device

    pool = load_pool(args.pool)  # a config error exits with code 2 before connecting
    try:
        connect(args.address)
    except NoCluster as err:
        return _fail(str(err))
    failed = 0
    for dev in pool.devices:
        try:
            handles = start_device(dev, detached=True, timeout_s=args.timeout)
        except DeviceError as err:
            print(f"physfarm: {err}", file=sys.stderr)
            failed += 1
            continue
        import ray

        infos = ray.get([h.info.remote() for h in handles])
        where = ", ".join(f"{i['name']} on {i['node_ip']}" for i in infos)
        print(f"up: {dev.name} ({dev.system.get('kind')}, {dev.replicas} replica"
              f"{'s' if dev.replicas > 1 else ''}): {where}")
    return 1 if failed else 0


def _fmt_lease(lease: dict | None) -> str:
    if not lease:
        return "-"
    return f"{lease['holder']} until {lease['until_text']}"


def format_status(rows: list[dict]) -> str:
    header = ["DEVICE", "REPLICA", "NODE", "STATUS", "UTIL(60s)", "QUEUE(rows/req)", "CLIENTS", "LEASE"]
    table = [header]
    for r in rows:
        alive = "utilisation" in r
        table.append([
            r["device"], str(r["replica"]), r.get("node", "-"), r["status"],
            f"{r['utilisation']:.0%}" if alive else "-",
            f"{r['queued_rows']}/{r['queued_requests']}" if alive else "-",
            str(len(r["active_clients"])) if alive else "-",
            _fmt_lease(r.get("lease")),
        ])
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def cmd_ls(args) -> int:
    try:
        connect(args.address)
    except NoCluster as err:
        return _fail(str(err))
    from .pool import pool_status
    rows = pool_status(timeout_s=args.timeout)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    elif not rows:
        print("no devices are up (start some with `physfarm devices up POOL.yaml`)")
    else:
        print(format_status(rows))
    return 0


def cmd_down(args) -> int:
    try:
        connect(args.address)
    except NoCluster as err:
        return _fail(str(err))
    from .pool import running_devices, stop_device
    running = running_devices()
    names = [args.name] if args.name else list(running)
    if args.name and args.name not in running:
        return _fail(f"device '{args.name}' is not up; running: {', '.join(running) or 'none'}")
    for name in names:
        n = stop_device(name)
        print(f"down: {name} ({n} replica{'s' if n != 1 else ''})")
    if not names:
        print("no devices are up")
    return 0


def add_devices_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("devices", help="a standing device pool on a Ray cluster: up, ls, down",
                              description="Manage a standing pool of device actors (docs/pool.md).")
    sub = p.add_subparsers(dest="devices_command", required=True)

    def address(q):
        q.add_argument("--address", default="auto",
                       help="Ray cluster to join (default: auto, the one started by `ray start` here)")

    up = sub.add_parser("up", help="start the devices of POOL.yaml as detached actors")
    up.add_argument("pool", help="YAML file with a `devices:` list (see examples/pool.yaml)")
    address(up)
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each device to start")
    up.set_defaults(func=cmd_up)

    ls = sub.add_parser("ls", help="per device and replica: node, status, utilisation, queue, clients, lease")
    address(ls)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for each replica to answer")
    ls.set_defaults(func=cmd_ls)

    down = sub.add_parser("down", help="stop all devices, or the one named")
    down.add_argument("name", nargs="?", default=None, help="device name (default: all)")
    address(down)
    down.set_defaults(func=cmd_down)
    return p
