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


def _fmt_users(users: dict) -> str:
    """The users active in the last 60 s, with their device seconds so far: 'alice 12.3s, bob 4.0s'."""
    active = [(n, u) for n, u in sorted(users.items()) if u.get("active")]
    return ", ".join(f"{n} {u['device_s']:.1f}s" for n, u in active) or "-"


def format_status(rows: list[dict]) -> str:
    header = ["DEVICE", "REPLICA", "NODE", "STATUS", "UTIL(60s)", "QUEUE(rows/req)", "CLIENTS", "USERS", "LEASE"]
    table = [header]
    for r in rows:
        alive = "utilisation" in r
        table.append([
            r["device"], str(r["replica"]), r.get("node", "-"), r["status"],
            f"{r['utilisation']:.0%}" if alive else "-",
            f"{r['queued_rows']}/{r['queued_requests']}" if alive else "-",
            str(len(r["active_clients"])) if alive else "-",
            _fmt_users(r.get("users") or {}) if alive else "-",
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


AUDIT_FIELDS = ("time", "user", "run", "rows", "theta", "duration_s", "device_s", "wait_s", "outcome", "replica")


def audit_records(device: str, since: float | None, user: str | None, timeout_s: float = 60.0) -> list[dict]:
    """The audit records of every running replica of `device`, oldest first (each replica reads its
    own file, on the device's node)."""
    import ray

    from .pool import find_device, running_devices

    replicas = running_devices().get(device)
    if not replicas:
        raise LookupError(f"device '{device}' is not up (running: {', '.join(running_devices()) or 'none'}); "
                          f"its audit log is read by its actor, on its node: bring it up, or read the file "
                          f"there (~/.physfarm/audit/{device}.REPLICA.jsonl, or the device's audit_dir)")
    handles = [h for h in (find_device(device, i) for i in replicas) if h is not None]
    records = [r for part in ray.get([h.audit.remote(since, user) for h in handles], timeout=timeout_s)
               for r in part]
    return sorted(records, key=lambda r: r.get("t", 0.0))


def usage_totals(records: list[dict]) -> dict[str, dict]:
    """Per user, from audit records: requests served, rows, device seconds, requests refused or failed."""
    out: dict[str, dict] = {}
    for r in records:
        acc = out.setdefault(r.get("user") or "unknown",
                             {"requests": 0, "rows": 0, "device_s": 0.0, "refused": 0, "failed": 0})
        outcome = str(r.get("outcome", ""))
        if outcome == "ok":
            acc["requests"] += 1
            acc["rows"] += int(r.get("rows", 0))
            acc["device_s"] += float(r.get("device_s", 0.0))
        elif outcome.startswith("refused"):
            acc["refused"] += 1
        else:
            acc["failed"] += 1
    return dict(sorted(out.items()))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def cmd_audit(args) -> int:
    import csv

    from .when import format_wall, parse_when

    try:
        since = parse_when(args.since, what="--since") if args.since else None
    except ValueError as err:
        print(f"physfarm: {err}", file=sys.stderr)
        return 2
    try:
        connect(args.address)
    except NoCluster as err:
        return _fail(str(err))
    try:
        records = audit_records(args.device, since, args.user)
    except LookupError as err:
        return _fail(str(err))
    if args.totals:
        totals = usage_totals(records)
        if args.format == "json":
            print(json.dumps(totals, indent=2))
        elif args.format == "csv":
            w = csv.writer(sys.stdout)
            w.writerow(["user", "requests", "rows", "device_s", "refused", "failed"])
            for name, t in totals.items():
                w.writerow([name, t["requests"], t["rows"], f"{t['device_s']:.6f}", t["refused"], t["failed"]])
        else:
            rows = [["USER", "REQUESTS", "ROWS", "DEVICE_S", "REFUSED", "FAILED"]]
            rows += [[n, str(t["requests"]), str(t["rows"]), f"{t['device_s']:.3f}", str(t["refused"]),
                      str(t["failed"])] for n, t in totals.items()]
            print(_table(rows) if totals else "no requests in the audit log for this selection")
        return 0
    for r in records:
        r["time"] = format_wall(r["t"])
    if args.format == "json":
        print(json.dumps(records, indent=1))
    elif args.format == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=["t", *AUDIT_FIELDS], extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    else:
        rows = [["TIME", "USER", "RUN", "ROWS", "THETA", "DURATION_S", "OUTCOME"]]
        rows += [[r["time"], str(r.get("user")), str(r.get("run")), str(r.get("rows")), str(r.get("theta")),
                  f"{float(r.get('duration_s', 0.0)):.4f}", str(r.get("outcome"))[:60]] for r in records]
        print(_table(rows) if records else "no requests in the audit log for this selection")
    return 0


def add_devices_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("devices", help="a standing device pool on a Ray cluster: up, ls, audit, down",
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

    audit = sub.add_parser("audit", help="a device's audit log: every request (time, user, run, rows, theta "
                           "hash, duration, outcome), or per-user totals",
                           description="Print or export the audit log of a device (all its replicas), kept "
                                       "on the device's node; see docs/pool.md 'Audit log'.")
    audit.add_argument("device", help="device name")
    audit.add_argument("--since", default=None, help="from this time: '2026-12-03 14:00', '14:00', or '2h' (ago)")
    audit.add_argument("--user", default=None, help="only this user's requests")
    audit.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    audit.add_argument("--totals", action="store_true", help="per-user totals instead of the requests")
    address(audit)
    audit.set_defaults(func=cmd_audit)

    down = sub.add_parser("down", help="stop all devices, or the one named")
    down.add_argument("name", nargs="?", default=None, help="device name (default: all)")
    address(down)
    down.set_defaults(func=cmd_down)
    return p
