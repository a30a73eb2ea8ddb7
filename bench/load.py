"""R-load-errors (TARGETS.md): 32 clients for 60 s on one device actor, errors counted.

One DeviceActor serving the coupled-oscillator simulator (n=16, seed 0, the documented mismatch and
noise, max 256 rows per device call) on a local Ray. 32 clients, each a thread of this driver with its
own `DeviceClient` (its own client id), send requests back to back for `--seconds` (60 by default);
each request's size is drawn from 1, 8, 32, 64, 128 or 256 rows (seeded per client) with in-envelope
values. Any exception a client sees is an error (timeouts, refusals, device faults; the client's
own retries are on, as in a sweep, and counted separately).

Reported in details: requests, rows/s, round-trip latency p50/p99 (ms) per request, requests per
client (min/max), the actor's own counters, the device actor process's resident memory (RSS, MB)
sampled every second (start, after warm-up, end, max; "flat" = growth from the warm-up sample to the
end under 10 %), the driver's RSS, and the load average (other work on the box slows everything).

    python -m bench.load                  # 60 s, writes bench/results/R-load-errors.json
    python -m bench.load --seconds 10     # shorter (still writes; the duration is in details)
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

COMMAND = "python -m bench.load"
CLIENTS = 32
SIZES = (1, 8, 32, 64, 128, 256)
N = 16
SYSTEM = {"kind": "oscillators", "n": N, "seed": 0}
FLAT_GROWTH = 0.10  # memory counts as flat if it grows less than 10 % after warm-up


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process on this machine (Linux /proc), MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run(seconds: float, clients: int = CLIENTS) -> dict:
    import ray

    from farm.client import DeviceClient
    from farm.config import DeviceConfig
    from farm.pool import start_device, stop_device

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="physfarm", log_to_driver=False)
    name = "load-osc"
    (handle,) = start_device(DeviceConfig(name=name, system=SYSTEM))
    try:
        info = ray.get(handle.info.remote())
        pid = info["pid"]
        spec = DeviceClient(name, client_id="load/probe").connect().spec
        theta = np.zeros(spec.n_params, np.float32)
        lat: list[list[float]] = [[] for _ in range(clients)]
        rows_done = [0] * clients
        errors: list[str] = []
        retried = [0] * clients
        stop = threading.Event()
        go = threading.Barrier(clients + 1)

        def client_loop(i: int) -> None:
            c = DeviceClient(name, client_id=f"load/{i}").connect()
            rng = random.Random(i)
            gen = np.random.default_rng(i)
            xs = {n: gen.uniform(-1, 1, size=(n, spec.n_inputs)).astype(np.float32) for n in SIZES}
            go.wait()
            while not stop.is_set():
                n = rng.choice(SIZES)
                t0 = time.perf_counter()
                try:
                    y = c.forward(xs[n], theta)
                    if tuple(y.shape) != (n, spec.n_outputs):
                        raise RuntimeError(f"wrong shape {tuple(y.shape)} for {n} rows")
                except Exception as err:  # noqa: BLE001 - every failure counts
                    errors.append(f"client {i}: {type(err).__name__}: {str(err)[:200]}")
                    continue
                lat[i].append(time.perf_counter() - t0)
                rows_done[i] += n
            retried[i] = c.retried

        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        go.wait()
        t_start = time.monotonic()
        stats0 = ray.get(handle.stats.remote())
        samples: list[tuple[float, float | None]] = []
        loads = [os.getloadavg()[0]]
        while (elapsed := time.monotonic() - t_start) < seconds:
            samples.append((round(elapsed, 1), rss_mb(pid)))
            time.sleep(min(1.0, max(0.0, seconds - elapsed)))
        samples.append((round(time.monotonic() - t_start, 1), rss_mb(pid)))
        loads.append(os.getloadavg()[0])
        stop.set()
        for t in threads:
            t.join(60)
        wall = time.monotonic() - t_start
        stats1 = ray.get(handle.stats.remote())
    finally:
        stop_device(name)
        if started_ray:
            ray.shutdown()

    all_lat = [v * 1000 for per in lat for v in per]
    rss = [m for _, m in samples if m is not None]
    warm_i = min(len(rss) - 1, max(1, len(rss) // 6))  # after the first sixth (10 s of 60)
    growth = (rss[-1] - rss[warm_i]) / rss[warm_i] if rss else float("nan")
    per_client = [len(v) for v in lat]
    return {
        "system": SYSTEM, "clients": clients, "client_kind": "threads of one driver process, one DeviceClient each",
        "request_rows": list(SIZES), "seconds": round(wall, 2), "errors": len(errors), "error_samples": errors[:10],
        "requests": len(all_lat), "rows": sum(rows_done), "rows_per_s": round(sum(rows_done) / wall, 1),
        "requests_per_s": round(len(all_lat) / wall, 1),
        "latency_ms": {"p50": round(percentile(all_lat, 50), 2), "p99": round(percentile(all_lat, 99), 2),
                       "max": round(max(all_lat), 2) if all_lat else None},
        "requests_per_client": {"min": min(per_client), "max": max(per_client)},
        "client_retries": sum(retried),
        "actor": {k: stats1[k] - stats0[k] for k in ("calls", "rows", "requests", "errors", "refused")},
        "actor_rows_per_call": round((stats1["rows"] - stats0["rows"]) / max(1, stats1["calls"] - stats0["calls"]), 1),
        "actor_rss_mb": {"start": round(rss[0], 1) if rss else None, "after_warmup": round(rss[warm_i], 1) if rss else None,
                         "end": round(rss[-1], 1) if rss else None, "max": round(max(rss), 1) if rss else None,
                         "growth_after_warmup": round(growth, 4), "flat": bool(growth < FLAT_GROWTH),
                         "samples": [(t, round(m, 1)) for t, m in samples if m is not None]},
        "driver_rss_mb": rss_mb(os.getpid()),
        "load_avg_1m": {"start": round(loads[0], 2), "end": round(loads[-1], 2)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the clients run (default 60)")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    details = run(args.seconds, args.clients)
    errors = details["errors"]
    met = errors == 0 and details["actor_rss_mb"]["flat"]
    lat = details["latency_ms"]
    print(f"R-load-errors: {errors} errors; {details['requests']} requests from {details['clients']} clients in "
          f"{details['seconds']} s, {details['rows_per_s']} rows/s, p50 {lat['p50']} ms, p99 {lat['p99']} ms; "
          f"actor RSS {details['actor_rss_mb']['start']} -> {details['actor_rss_mb']['end']} MB "
          f"(growth after warm-up {100 * details['actor_rss_mb']['growth_after_warmup']:.1f} %)")
    if not args.no_write:
        from .common import write_result

        cmd = COMMAND if args.seconds == 60 and args.clients == CLIENTS else \
            f"{COMMAND} --seconds {args.seconds:g} --clients {args.clients}"
        write_result("R-load-errors", errors, "errors", "0", met, cmd, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
