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


def _fmt_reserved(reservations: list[dict]) -> str:
    """The reservation in force ('alice until 2026-12-03 16:00'), else the next one, else '-'."""
    import time

    if not reservations:
        return "-"
    first = min(reservations, key=lambda r: r["start"])
    if first["start"] <= time.time():
        return f"{first['user']} until {first['end_text']}"
    return f"next: {first['user']} {first['start_text']} to {first['end_text']}"


def format_status(rows: list[dict]) -> str:
    header = ["DEVICE", "REPLICA", "NODE", "STATUS", "UTIL(60s)", "QUEUE(rows/req)", "CLIENTS", "USERS", "LEASE",
              "RESERVED"]
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
            _fmt_reserved(r.get("reservations") or []),
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


# -- leases and reservations ------------------------------------------------------------------------
def _replica_handles(device: str) -> list:
    from .pool import find_device, running_devices

    replicas = running_devices().get(device)
    if not replicas:
        raise LookupError(f"device '{device}' is not up (running: {', '.join(running_devices()) or 'none'}); "
                          f"start it with `physfarm devices up POOL.yaml`")
    return [h for h in (find_device(device, i) for i in replicas) if h is not None]


def _lease_file(device: str):
    from pathlib import Path

    return Path.home() / ".physfarm" / "leases" / f"{device}.json"


def _unwrap(err: BaseException) -> BaseException:
    """The error an actor raised (Ray wraps it in a RayTaskError that is also an instance of it)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(_unwrap(err)).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def cmd_lease(args) -> int:
    import time
    import uuid

    import ray

    from .runinfo import current_user
    from .when import format_wall, parse_when

    try:
        until = parse_when(args.for_, bare_span="ahead", what="--for")
    except ValueError as err:
        print(f"physfarm: {err}", file=sys.stderr)
        return 2
    holder = args.holder or current_user()
    try:
        connect(args.address)
        handles = _replica_handles(args.device)
    except (NoCluster, LookupError) as err:
        return _fail(str(err))
    token = uuid.uuid4().hex
    taken = []
    try:
        for h in handles:  # heartbeat 0: no process renews it; it lasts until its end or `release`
            ray.get(h.acquire_lease.remote(holder, token, until, 0.0, "cli"))
            taken.append(h)
    except Exception as err:  # noqa: BLE001 - refused (another holder) or a bad duration: said in one line
        for h in taken:
            ray.get(h.release_lease.remote(token))
        return _fail(_first_line(err))
    path = _lease_file(args.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": args.device, "holder": holder, "token": token, "until": until,
                                "taken": time.time()}))
    path.chmod(0o600)  # the token releases the lease
    print(f"leased: {args.device} to {holder} until {format_wall(until)} ({len(handles)} replica"
          f"{'s' if len(handles) != 1 else ''}); only {holder}'s requests are served. End it with "
          f"`physfarm devices release {args.device}`")
    return 0


def cmd_release(args) -> int:
    import ray

    path = _lease_file(args.device)
    if not path.exists():
        return _fail(f"no lease on '{args.device}' taken from this account (`physfarm devices lease` keeps its "
                     f"token in {path}); a lease taken in Python ends with `release()` or its process")
    saved = json.loads(path.read_text())
    try:
        connect(args.address)
        handles = _replica_handles(args.device)
    except (NoCluster, LookupError) as err:
        return _fail(str(err))
    try:
        ended = [ray.get(h.release_lease.remote(saved["token"])) for h in handles]
    except Exception as err:  # noqa: BLE001 - e.g. another holder's lease now
        return _fail(_first_line(err))
    path.unlink()
    print(f"released: {args.device} ({sum(ended)} replica lease{'s' if sum(ended) != 1 else ''} ended"
          f"{'; it had already ended' if not any(ended) else ''})")
    return 0


def cmd_reserve(args) -> int:
    import uuid

    import ray

    from .runinfo import current_user
    from .when import parse_when

    try:
        start = parse_when(args.from_, bare_span="ahead", what="--from")
        end = parse_when(args.to, bare_span="ahead", what="--to")
    except ValueError as err:
        print(f"physfarm: {err}", file=sys.stderr)
        return 2
    me = current_user()
    user = args.user or me
    try:
        connect(args.address)
        handles = _replica_handles(args.device)
    except (NoCluster, LookupError) as err:
        return _fail(str(err))
    rid = uuid.uuid4().hex[:8]
    done, res = [], None
    try:
        for h in handles:
            res = ray.get(h.reserve.remote(user, start, end, me, args.note or "", rid))
            done.append(h)
    except Exception as err:  # noqa: BLE001 - an overlap or a bad window: said in one line
        for h in done:
            ray.get(h.unreserve.remote(rid))
        return _fail(_first_line(err))
    print(f"reserved: {args.device} for {user} from {res['start_text']} to {res['end_text']} (id {rid}); "
          f"only {user}'s requests are served then. Cancel with `physfarm devices unreserve {args.device} {rid}`")
    return 0


def cmd_unreserve(args) -> int:
    import ray

    try:
        connect(args.address)
        handles = _replica_handles(args.device)
    except (NoCluster, LookupError) as err:
        return _fail(str(err))
    try:
        res = [ray.get(h.unreserve.remote(args.id)) for h in handles][0]
    except Exception as err:  # noqa: BLE001 - no such id
        return _fail(_first_line(err).strip("'\""))
    print(f"cancelled: reservation {args.id} of {args.device} for {res['user']} ({res['start_text']} to "
          f"{res['end_text']})")
    return 0


def cmd_reservations(args) -> int:
    import ray

    from .pool import running_devices

    try:
        connect(args.address)
        names = [args.device] if args.device else list(running_devices())
        rows = []
        for name in names:
            handles = _replica_handles(name)
            for r in ray.get(handles[0].reservations.remote()):
                rows.append({"device": name, **r})
    except (NoCluster, LookupError) as err:
        return _fail(str(err))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no reservations" + (f" of {args.device}" if args.device else ""))
    else:
        table = [["DEVICE", "ID", "USER", "FROM", "TO", "BOOKED BY", "NOTE"]]
        table += [[r["device"], r["id"], r["user"], r["start_text"], r["end_text"], r["by"], r.get("note", "")]
                  for r in sorted(rows, key=lambda r: r["start"])]
        print(_table(table))
    return 0


def add_devices_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("devices", help="a standing device pool on a Ray cluster: up, ls, audit, lease, reserve, down",
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

    lease = sub.add_parser("lease", help="reserve a device for yourself from now, until released or --for ends",
                           description="Take a lease on every replica of DEVICE: only the holder's requests "
                                       "are served (the holder is a person, or a client id and those under it). "
                                       "It needs no running process and outlives actor restarts; "
                                       "`physfarm devices release DEVICE` ends it.")
    lease.add_argument("device", help="device name")
    lease.add_argument("--for", dest="for_", required=True, help="how long: '2h', '30m', or an end time '18:00'")
    lease.add_argument("--holder", default=None, help="who holds it (default: $PHYSFARM_USER, else your login)")
    address(lease)
    lease.set_defaults(func=cmd_lease)

    release = sub.add_parser("release", help="end the lease you took with `physfarm devices lease`")
    release.add_argument("device", help="device name")
    address(release)
    release.set_defaults(func=cmd_release)

    reserve = sub.add_parser("reserve", help="book a time window in which only one user is served",
                             description="Book DEVICE from --from to --to for a user (default you): in that "
                                         "window only that user's requests are served. Overlapping windows are "
                                         "refused. Kept on the device's node; survives actor restarts.")
    reserve.add_argument("device", help="device name")
    reserve.add_argument("--from", dest="from_", required=True,
                         help="start: '2026-12-03 14:00', '14:00' (today), 'now' or '+2h'")
    reserve.add_argument("--to", required=True, help="end, in the same forms")
    reserve.add_argument("--user", default=None, help="for whom (default: $PHYSFARM_USER, else your login)")
    reserve.add_argument("--note", default=None, help="a note shown in the list")
    address(reserve)
    reserve.set_defaults(func=cmd_reserve)

    unreserve = sub.add_parser("unreserve", help="cancel a reservation by its id")
    unreserve.add_argument("device", help="device name")
    unreserve.add_argument("id", help="the reservation's id (`physfarm devices reservations` lists them)")
    address(unreserve)
    unreserve.set_defaults(func=cmd_unreserve)

    resv = sub.add_parser("reservations", help="the reservations in force or ahead, of one device or all")
    resv.add_argument("device", nargs="?", default=None, help="device name (default: every device up)")
    resv.add_argument("--json", action="store_true", help="print JSON instead of a table")
    address(resv)
    resv.set_defaults(func=cmd_reservations)

    down = sub.add_parser("down", help="stop all devices, or the one named")
    down.add_argument("name", nargs="?", default=None, help="device name (default: all)")
    address(down)
    down.set_defaults(func=cmd_down)
    return p
