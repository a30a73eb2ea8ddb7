"""S1 and S2: one device shared by several people, with a priority class, a quota and a restart.

    python -m bench.sharing [--seconds 20]

On a local Ray, one simulated device (10 ms per call, at most 64 rows per call) with
`priorities: {users: {carol: high}}` and `quotas: {users: {dave: Q}}`. At once:
  - alice and bob each run a "sweep" of two trials: two clients each (`alice-sweep/t0`, ...), every
    one keeping one 64-row request in flight, back to back (their configured share: equal, half of
    the device time the normal class gets);
  - carol (class high) sends a 16-row request every 100 ms and measures her queue wait;
  - dave (no class, quota Q device-seconds) sends 64-row requests until refused for quota;
  - half way through, the device actor is killed (`ray.kill(no_restart=False)`); Ray restarts it and
    the clients retry what was in flight.
The clients stand in for sweeps' trials (same DeviceClient, same requests); a sweep's Tune and
MLflow add nothing to how the device shares its time.

S1 = max over alice and bob of |their share of the normal class's device time - 0.5|, from the
audit log (device_s per user). S2 = answered requests missing from the audit log: per client, the
requests it got answers for minus the log's `ok` records of that client, summed where positive.
Also written: carol's median queue wait against alice's and bob's, dave's refusals and whether
each was due (his charged use + the request's estimate passing Q).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import write_result

N = 16
QUOTA_S = 0.4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="how long the users send requests")
    args = p.parse_args(argv)

    import ray

    from actors.audit import read
    from actors.errors import QuotaExceededError
    from farm.client import DeviceClient
    from farm.config import DeviceConfig
    from farm.pool import find_device, start_device, stop_device

    audit_dir = Path(tempfile.mkdtemp(prefix="physfarm-sharing-"))
    ray.init(num_cpus=2, include_dashboard=False, namespace="physfarm", log_to_driver=False)
    dev = DeviceConfig(name="shared", system={"kind": "oscillators", "n": N, "latency_call_s": 0.01, "max_rows": 64},
                       max_restarts=3, audit_dir=str(audit_dir), retries=10, retry_backoff_s=0.05,
                       quotas={"users": {"dave": QUOTA_S}}, priorities={"users": {"carol": "high"}})
    handles = start_device(dev)
    theta = np.zeros(N * N + N, np.float32)
    stop_at = time.time() + args.seconds
    answered: dict[str, int] = {}
    dave = {"refused": 0, "errors": []}
    lock = threading.Lock()

    def trial(user: str, cid: str) -> None:
        client = DeviceClient("shared", client_id=cid, user=user).connect()
        x = np.full((64, N), 0.1, np.float32)
        while time.time() < stop_at:
            client.forward(x, theta)
            with lock:
                answered[cid] = answered.get(cid, 0) + 1

    def carol() -> None:
        client = DeviceClient("shared", client_id="carol/nb", user="carol").connect()
        x = np.full((16, N), 0.1, np.float32)
        while time.time() < stop_at:
            client.forward(x, theta)
            with lock:
                answered["carol/nb"] = answered.get("carol/nb", 0) + 1
            time.sleep(0.1)

    def dave_run() -> None:
        client = DeviceClient("shared", client_id="dave/nb", user="dave").connect()
        x = np.full((64, N), 0.1, np.float32)
        while time.time() < stop_at:
            try:
                client.forward(x, theta)
                with lock:
                    answered["dave/nb"] = answered.get("dave/nb", 0) + 1
            except QuotaExceededError as err:
                dave["refused"] += 1
                dave["errors"].append(str(err)[:300])
                return

    threads = [threading.Thread(target=trial, args=(u, f"{u}-sweep/t{i}")) for u in ("alice", "bob") for i in (0, 1)]
    threads += [threading.Thread(target=carol), threading.Thread(target=dave_run)]
    t0 = time.time()
    [t.start() for t in threads]
    time.sleep(args.seconds / 2)
    ray.kill(find_device("shared"), no_restart=False)  # a restart half way
    killed_at = time.time()
    [t.join(args.seconds + 120) for t in threads]
    stats = ray.get(find_device("shared").stats.remote())
    del handles
    stop_device("shared")
    ray.shutdown()

    recs = [r for r in read(audit_dir / "shared.0.jsonl") if "event" not in r]
    ok = [r for r in recs if r["outcome"] == "ok"]
    logged: dict[str, int] = {}
    for r in ok:
        logged[r["run"]] = logged.get(r["run"], 0) + 1
    missing = {cid: max(0, n - logged.get(cid, 0)) for cid, n in answered.items()}
    s2 = sum(missing.values())

    device_s = {u: sum(r["device_s"] for r in ok if r["user"] == u) for u in ("alice", "bob", "carol", "dave")}
    normal = device_s["alice"] + device_s["bob"]
    shares = {u: device_s[u] / normal for u in ("alice", "bob")}
    s1 = max(abs(shares[u] - 0.5) for u in shares)

    def waits(user: str) -> list[float]:
        return [r["wait_s"] for r in ok if r["user"] == user]

    per_row = statistics.median(r["device_s"] / r["rows"] for r in ok if r["rows"])
    refusals = [r for r in recs if r["outcome"].startswith("refused: QuotaExceededError")]
    due = []
    for ref in refusals:  # was each refusal due? dave's charged use before it + the request's estimate
        used = sum(r["device_s"] for r in ok if r["user"] == "dave" and r["t"] <= ref["t"])
        due.append(used + ref["rows"] * per_row > QUOTA_S)
    details = {
        "seconds": args.seconds, "killed_after_s": round(killed_at - t0, 2), "restarts": stats.get("restarts"),
        "device_s": {u: round(v, 3) for u, v in device_s.items()},
        "normal_class_shares": {u: round(v, 4) for u, v in shares.items()}, "configured_share": 0.5,
        "answered": answered, "logged_ok": logged, "missing_per_client": missing,
        "carol_wait_median_s": round(statistics.median(waits("carol")), 5) if waits("carol") else None,
        "alice_bob_wait_median_s": round(statistics.median(waits("alice") + waits("bob")), 5),
        "dave": {"quota_s": QUOTA_S, "charged_s": round(device_s["dave"], 4), "refused": len(refusals),
                 "refusals_due": due, "message": dave["errors"][:1]},
        "audit_records": len(recs), "audit_file": str(audit_dir / "shared.0.jsonl"),
    }
    write_result("S1", s1, "max abs share deviation", "<= 0.05", s1 <= 0.05, "python -m bench.sharing", details)
    write_result("S2", s2, "answered requests missing from the audit log", "0", s2 == 0,
                 "python -m bench.sharing", details)
    print(f"S1 share deviation {s1:.4f} (alice {shares['alice']:.3f}, bob {shares['bob']:.3f}); "
          f"S2 missing {s2}; carol's median wait {details['carol_wait_median_s']} s vs "
          f"{details['alice_bob_wait_median_s']} s; dave refused {len(refusals)} (due: {due}), "
          f"charged {device_s['dave']:.3f} of {QUOTA_S} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
