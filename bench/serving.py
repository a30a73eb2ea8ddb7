"""Serving figures P1, P2, P4 (TARGETS.md): the farm's own cost of serving forward passes.

P1  device utilisation: 8 clients each sending 64-row requests back to back to one device actor that
    costs 10 ms per call + 0.01 ms per row (really slept), max 256 rows per call; busy time / wall
    time at the actor over a steady-state window (after a warm-up).
P2  throughput in the P1 set-up as a fraction of the device's own limit (256 rows per 12.56 ms =
    20.4k rows/s), and the gain over batching off (the same device with max 64 rows per call, i.e.
    one request per call; 3.4x expected).
    Operating point of P1/P2: the device's `max_wait_ms` = 2 (`--max-wait-ms`): without it a call
    starts with whatever is queued when the last one ends, and the clients answered by that call,
    one Ray round trip away, often miss it (calls averaged ~225 of 256 rows).
P4  median round trip of one 256 x 64 float32 request through `DeviceClient.forward` to a device
    actor whose device costs nothing (`NullSystem` below), one client, sequential.

The device of P1/P2 is `SleepSystem` below: its cost, 10 ms per call + 0.01 ms per row, is slept
like an instrument waiting on its hardware (a call of 256 rows takes 12.56 ms), so the figures
measure the farm and not a simulator's compute; `--device oscillators` runs the oscillators simulator
(n=8) with the same latencies instead (its own compute then shares the actor's CPU). Clients are
threads of this driver, each with its own DeviceClient (its own client id). Windows repeat; the
figures are medians. The machine's load average is recorded (other work on the box lowers them).

    python -m bench.serving                 # writes bench/results/P1.json, P2.json, P4.json
    python -m bench.serving --quick         # short windows, prints only
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from actors.spec import SystemSpec

COMMAND = "python -m bench.serving"
CALL_S, ROW_S, MAX_ROWS, REQUEST_ROWS, CLIENTS = 0.010, 0.00001, 256, 64, 8
LIMIT_ROWS_PER_S = MAX_ROWS / (CALL_S + ROW_S * MAX_ROWS)  # 20382 rows/s


class NullConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    n: int = 64
    max_rows: int = 256


class NullSystem:
    """A device that costs nothing: y = x. Isolates the serving path's own cost (P4)."""

    config_class = NullConfig

    def __init__(self, config: NullConfig):
        self.config = config

    @property
    def spec(self) -> SystemSpec:
        return SystemSpec(name="null", n_inputs=self.config.n, n_params=1, n_outputs=self.config.n,
                          input_range=(-1.0, 1.0), param_range=(-1.0, 1.0), max_rows=self.config.max_rows)

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def ideal_model(self) -> torch.nn.Module:
        return torch.nn.Identity()

    def forward(self, x, theta) -> torch.Tensor:
        return x


class SleepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    n: int = 8
    max_rows: int = 256
    call_s: float = CALL_S
    row_s: float = ROW_S


class SleepSystem:
    """A device whose cost is exactly call_s + rows * row_s, slept (like an instrument waiting on its
    hardware: no CPU, no GIL), y = x. Isolates the farm's serving cost from simulator compute."""

    config_class = SleepConfig

    def __init__(self, config: SleepConfig):
        self.config = config

    @property
    def spec(self) -> SystemSpec:
        c = self.config
        return SystemSpec(name="sleep", n_inputs=c.n, n_params=1, n_outputs=c.n, input_range=(-1.0, 1.0),
                          param_range=(-1.0, 1.0), max_rows=c.max_rows, latency_s=c.call_s + c.row_s * c.max_rows)

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def ideal_model(self) -> torch.nn.Module:
        return torch.nn.Identity()

    def forward(self, x, theta) -> torch.Tensor:
        t0 = time.perf_counter()
        y = torch.as_tensor(x).clone()
        left = self.config.call_s + self.config.row_s * y.shape[0] - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return y


def _device(kind: str, max_rows: int) -> dict:
    if kind == "oscillators":
        return {"kind": "oscillators", "n": 8, "seed": 0, "latency_call_s": CALL_S, "latency_row_s": ROW_S,
                "max_rows": max_rows}
    return {"kind": "bench.serving:SleepSystem", "n": 8, "max_rows": max_rows}


def _call_loop(fn, out: list[float], count: int | None = None, stop: threading.Event | None = None) -> list[float]:
    """Call `fn()` back to back, appending each call's wall seconds to `out` (readable while it runs):
    `count` times, or until `stop` is set. The one client loop of P1/P2 (per client thread) and P4."""
    done = 0
    while (count is None or done < count) and not (stop is not None and stop.is_set()):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        done += 1
    return out


def _window(name: str, seconds: float, warmup: float) -> dict:
    """8 client threads sending 64-row requests back to back; figures over a window after warm-up."""
    from farm.client import DeviceClient
    from farm.pool import find_device

    handle = find_device(name)
    clients = [DeviceClient(name, client_id=f"client-{i}").connect() for i in range(CLIENTS)]
    n_in = clients[0].spec.n_inputs
    theta = np.zeros(clients[0].spec.n_params, np.float32)
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in clients]

    def run(i: int) -> None:
        rng = np.random.default_rng(i)
        x = rng.uniform(-0.5, 0.5, size=(REQUEST_ROWS, n_in)).astype(np.float32)
        _call_loop(lambda: clients[i].forward(x, theta), latencies[i], stop=stop)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    import ray

    s0 = ray.get(handle.stats.remote())
    marks = [len(lat) for lat in latencies]
    time.sleep(seconds)
    s1 = ray.get(handle.stats.remote())
    stop.set()
    for t in threads:
        t.join()
    span = s1["now"] - s0["now"]
    calls = s1["calls"] - s0["calls"]
    rows = s1["rows"] - s0["rows"]
    window_lat = [v for lat, m in zip(latencies, marks) for v in lat[m:]]
    return {
        "utilisation": (s1["busy_s"] - s0["busy_s"]) / span,
        "rows_per_s": rows / span,
        "calls": calls,
        "rows_per_call": rows / calls if calls else 0.0,
        "window_s": span,
        "request_latency_ms_median": 1000 * statistics.median(window_lat) if window_lat else None,
        "errors": s1["errors"] - s0["errors"],
    }


def _serve(kind: str, max_rows: int, repeats: int, seconds: float, warmup: float,
           max_wait_ms: float = 0.0) -> list[dict]:
    from farm.config import DeviceConfig
    from farm.pool import start_device, stop_device

    name = f"bench-serving-{max_rows}"
    handles = start_device(DeviceConfig(name=name, system=_device(kind, max_rows),  # noqa: F841 (keep)
                                        max_wait_ms=max_wait_ms))
    try:
        return [_window(name, seconds, warmup if r == 0 else 0.5) for r in range(repeats)]
    finally:
        stop_device(name)


def _round_trips(n: int) -> dict:
    import ray

    from farm.client import DeviceClient
    from farm.config import DeviceConfig
    from farm.pool import start_device, stop_device

    name = "bench-null"
    handles = start_device(DeviceConfig(name=name, system={"kind": "bench.serving:NullSystem"}))
    try:
        client = DeviceClient(name, client_id="p4").connect()
        x = np.random.default_rng(0).uniform(-1, 1, size=(256, 64)).astype(np.float32)
        theta = np.zeros(1, np.float32)
        h = handles[0]

        def timed(fn) -> list[float]:  # ms per call, after max(20, n/10) warm-up calls
            _call_loop(fn, [], count=max(20, n // 10))
            return [1000 * s for s in _call_loop(fn, [], count=n)]

        via_client = timed(lambda: client.forward(x, theta))
        raw_actor = timed(lambda: ray.get(h.forward.remote(x, theta, "p4-raw")))
        ping = timed(lambda: ray.get(h.ping.remote()))
        y = client.forward(x, theta)
        assert y.shape == (256, 64) and np.array_equal(y.numpy(), x)
        return {
            "client_ms": statistics.median(via_client),
            "client_ms_p90": float(np.percentile(via_client, 90)),
            "raw_actor_forward_ms": statistics.median(raw_actor),
            "ping_ms": statistics.median(ping),
            "round_trips": n,
        }
    finally:
        stop_device(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="measurement windows per set-up (median)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one window")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the first window")
    parser.add_argument("--round-trips", type=int, default=1000, help="P4 round trips")
    parser.add_argument("--device", choices=["sleep", "oscillators"], default="sleep",
                        help="P1/P2 device: SleepSystem (exact slept cost) or the oscillators simulator "
                             "(n=8, same latencies, plus its own compute)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0,
                        help="P1/P2 device's max_wait_ms: a call that is not full waits up to this long for "
                             "more rows (the answered clients' next requests are one round trip away); 0 "
                             "starts each call as soon as the last one ends (the DeviceConfig default)")
    parser.add_argument("--quick", action="store_true", help="one short window each, print only")
    args = parser.parse_args(argv)
    command = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
    if args.quick:
        args.repeats, args.seconds, args.warmup, args.round_trips = 1, 1.5, 1.0, 200

    import logging

    import ray

    from bench.common import write_result

    load_before = os.getloadavg()[0]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, namespace="physfarm",
             log_to_driver=False, logging_level=logging.WARNING)
    try:
        on = _serve(args.device, MAX_ROWS, args.repeats, args.seconds, args.warmup, args.max_wait_ms)
        off = _serve(args.device, REQUEST_ROWS, args.repeats, args.seconds, args.warmup, args.max_wait_ms)
        p4 = _round_trips(args.round_trips)
    finally:
        ray.shutdown()
    load_after = os.getloadavg()[0]

    util = statistics.median(w["utilisation"] for w in on)
    thr_on = statistics.median(w["rows_per_s"] for w in on)
    thr_off = statistics.median(w["rows_per_s"] for w in off)
    fraction = thr_on / LIMIT_ROWS_PER_S
    gain = thr_on / thr_off
    setup = {"clients": CLIENTS, "request_rows": REQUEST_ROWS, "max_rows": MAX_ROWS,
             "latency_call_s": CALL_S, "latency_row_s": ROW_S, "device": _device(args.device, MAX_ROWS),
             "max_wait_ms": args.max_wait_ms, "windows": args.repeats, "window_s": args.seconds, "warmup_s": args.warmup,
             "clients_are": "threads of the driver, one DeviceClient each",
             "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(load_after, 2)}
    print(f"P1 utilisation           {util:.3f}   (target >= 0.95; windows {[round(w['utilisation'], 3) for w in on]})")
    print(f"P2 throughput            {thr_on:.0f} rows/s = {fraction:.3f} of {LIMIT_ROWS_PER_S:.0f} (target >= 0.90)")
    print(f"   batching off          {thr_off:.0f} rows/s; gain {gain:.2f}x (about 3.4x expected)")
    print(f"P4 round trip 256x64     {p4['client_ms']:.2f} ms median via DeviceClient "
          f"(raw actor call {p4['raw_actor_forward_ms']:.2f} ms, ping {p4['ping_ms']:.2f} ms; target <= 2 ms)")
    print(f"load average (1 min) before {load_before:.2f}, after {load_after:.2f} on {os.cpu_count()} cores")
    if args.quick:
        return 0
    write_result("P1", util, "fraction", ">= 0.95 (the physical limit is 1.0)", util >= 0.95, command,
                 {**setup, "per_window": on})
    write_result("P2", fraction, "fraction", ">= 0.90", fraction >= 0.90, command,
                 {**setup, "rows_per_s": thr_on, "limit_rows_per_s": LIMIT_ROWS_PER_S,
                  "batching_off_rows_per_s": thr_off, "gain_over_batching_off": gain,
                  "gain_expected": LIMIT_ROWS_PER_S / (REQUEST_ROWS / (CALL_S + ROW_S * REQUEST_ROWS)),
                  "per_window": on, "per_window_batching_off": off})
    write_result("P4", p4["client_ms"], "ms", "<= 2 ms on this 2-core machine", p4["client_ms"] <= 2.0,
                 command, {**p4, "request": "256 x 64 float32, theta[1], NullSystem (y = x)",
                           "load_avg_1m_before": round(load_before, 2),
                           "load_avg_1m_after": round(load_after, 2)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
