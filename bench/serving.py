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
    actor whose device costs nothing (`NullSystem` below), one client, sequential, over a plain sync
    Ray actor's (`def forward(self, x, theta): return x`) for the same payload; calls interleaved
    with those of reference actors (threaded, async, threaded with a device-thread handoff) so that
    `breakdown_ms` says what each layer of the path costs, plus in-process microseconds of its steps
    (envelope check, audit write, answer copy). The client is on the device's node, so its requests
    take the local channel (actors/local_channel.py); `physfarm_client_over_ray` is the same client
    with `local_channel=False` (what a trainer on another node gets).

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

from actors.device_actor import RAY_THREADS
from actors.spec import SystemSpec

COMMAND = "python -m bench.serving"
CALL_S, ROW_S, MAX_ROWS, REQUEST_ROWS, CLIENTS = 0.010, 0.00001, 256, 64, 8
LIMIT_ROWS_PER_S = MAX_ROWS / (CALL_S + ROW_S * MAX_ROWS)  # 20382 rows/s

# What issue 19's changes gave, measured once (not by this script: the code before them is gone from
# this tree) and quoted in P4's details. See the entries for how.
BEFORE_AFTER = {
    "whole_path": {
        "what": "P4's ratio (DeviceClient round trip over a plain sync actor's, 256 x 64, medians of 300-400 "
                "interleaved calls per process), the tree before issue 19 (commit c37b567, async actor) and after, "
                "in alternating processes on this 2-core machine, load average 6.2-7.2 (other work on the box)",
        "before": [1.608, 1.481, 1.667], "after": [1.410, 1.386, 1.362],
        "before_median": 1.608, "after_median": 1.386,
    },
    "threaded_instead_of_async": "see breakdown_ms.async_over_threaded (reference actors, same run)",
    "envelope_check_us": {"before": 32.1, "after": 18.9,
                          "what": "check_request on a 256 x 64 float32 request, in-process, old and new code "
                                  "interleaved in one process (load ~11); min/max fast path instead of isfinite "
                                  "+ min + max"},
    "identity_as_one_argument_ms": {"three_args": 2.154, "one_tuple": 2.082, "two_args_only": 1.993,
                                    "what": "plain sync actor, x, theta plus (client, token, user) as three "
                                            "arguments or one tuple (DeviceActor.serve); medians of 400 interleaved"},
    "what_remains_in_the_actor": {
        "what": "one run (load 5.5), ratio to a plain sync actor, 400 interleaved calls: physfarm's actor with "
                "parts of its work switched off, against the threaded hand-off floor",
        "threaded_handoff": 1.068, "actor_full": 1.422, "without_audit_write": 1.352,
        "without_envelope_check": 1.306, "without_both": 1.264,
        "reading": "under load every microsecond of Python in the actor costs several times its in-process "
                   "figure (in_process_us); the audit write is kept (S2: an answered request is always logged "
                   "first), the envelope check is the safety boundary",
    },
    "copies": "one each way, kept: the actor's concatenate (Ray's buffers are read-only; the device gets a "
              "writable batch) and the client's copy of the answer (in_process_us.answer_copy_us)",
}


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


def _reference_actors() -> dict:
    """Ray actors that do nothing but answer y = x (NullSystem's output), one per serving model: the
    figures physfarm's round trip is read against (P4's denominator is `plain_sync`)."""
    import ray

    from actors.device_actor import RAY_THREADS

    class Plain:  # what a user would write first: a plain (sync, one-thread) Ray actor
        def forward(self, x, theta):
            return x

    class AsyncPlain:  # the serving model physfarm had before issue 19
        async def forward(self, x, theta):
            return x

    class Handoff:
        """A threaded actor that hands each request to one device thread and waits for its answer:
        the least a device-thread actor can cost (physfarm's actor minus its checks and bookkeeping)."""

        def __init__(self):
            self._cond = threading.Condition()
            self._todo: list = []
            threading.Thread(target=self._device, daemon=True).start()

        def _device(self):
            while True:
                with self._cond:
                    while not self._todo:
                        self._cond.wait()
                    x, box, done = self._todo.pop(0)
                box.append(np.concatenate([x]))
                done.set()

        def forward(self, x, theta):
            box, done = [], threading.Event()
            with self._cond:
                self._todo.append((x, box, done))
                self._cond.notify()
            done.wait()
            return box[0]

    remote = ray.remote(num_cpus=0)
    return {"plain_sync": remote(Plain).remote(),
            "plain_threaded": remote(Plain).options(max_concurrency=RAY_THREADS).remote(),
            "plain_async": remote(AsyncPlain).remote(),
            "threaded_handoff": remote(Handoff).options(max_concurrency=RAY_THREADS).remote()}


def _in_process_costs(x: np.ndarray, theta: np.ndarray, n: int = 2000) -> dict:
    """Microseconds of the serving path's own steps for one 256 x 64 request, in this process."""
    import tempfile
    import timeit
    from pathlib import Path

    from actors.audit import AuditLog
    from actors.device_actor import DeviceActor
    from actors.envelope import check_request

    spec = NullSystem(NullConfig(kind="null")).spec
    frozen = x.copy()
    frozen.setflags(write=False)  # as Ray hands it to the actor
    folder = Path(tempfile.mkdtemp(prefix="p4-audit-"))
    log = AuditLog(folder / "null.0.jsonl")
    actor = DeviceActor({"kind": "bench.serving:NullSystem"}, name="p4-inproc#0", audit_dir_path=str(folder))

    def us(fn) -> float:
        fn()
        return 1e6 * min(timeit.repeat(fn, number=max(1, n // 5), repeat=5)) / max(1, n // 5)

    try:
        return {
            "envelope_check_us": us(lambda: check_request(spec, frozen, theta, device="d", batched_theta=False)),
            "audit_write_us": us(lambda: log.call(time.time(), 1e-4, [("u", "c", 256, theta, 1e-4, 0.0)])),
            "answer_copy_us": us(lambda: torch.from_numpy(np.array(frozen, dtype=np.float32))),
            "actor_forward_in_process_us": us(lambda: actor.forward(frozen, theta, "c")),
        }
    finally:
        actor.close()
        log.close()


def _round_trips(n: int) -> dict:
    """P4: physfarm's round trip and the reference actors', interleaved call by call (medians, ms)."""
    import ray

    from farm.client import DeviceClient
    from farm.config import DeviceConfig
    from farm.pool import start_device, stop_device

    name = "bench-null"
    handles = start_device(DeviceConfig(name=name, system={"kind": "bench.serving:NullSystem"}))
    refs = _reference_actors()
    try:
        client = DeviceClient(name, client_id="p4").connect()  # over the local channel (the default)
        over_ray = DeviceClient(name, client_id="p4-ray", local_channel=False).connect()
        x = np.random.default_rng(0).uniform(-1, 1, size=(256, 64)).astype(np.float32)
        theta = np.zeros(1, np.float32)
        h = handles[0]
        calls = {"physfarm_client": lambda: client.forward(x, theta),
                 "physfarm_client_over_ray": lambda: over_ray.forward(x, theta),
                 "physfarm_actor_raw": lambda: ray.get(h.forward.remote(x, theta, "p4-raw")),
                 **{k: (lambda a=a: ray.get(a.forward.remote(x, theta))) for k, a in refs.items()},
                 "ping": lambda: ray.get(h.ping.remote())}
        for fn in calls.values():  # warm-up: workers, caches, every Ray thread of the threaded ones
            _call_loop(fn, [], count=max(20, n // 10))
        ms: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(n):  # interleaved: load hits every kind alike
            for k, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                ms[k].append(1000 * (time.perf_counter() - t0))
        y = client.forward(x, theta)
        if y.shape != (256, 64) or not np.array_equal(y.numpy(), x):
            raise RuntimeError("the null device did not answer y = x")
        if client.channel_requests < n or over_ray.channel_requests:
            raise RuntimeError("the local channel was not used as configured")
        med = {k: statistics.median(v) for k, v in ms.items()}
        plain = med["plain_sync"]
        return {
            "ratio": med["physfarm_client"] / plain,
            "client_ms": med["physfarm_client"],
            "client_ms_p90": float(np.percentile(ms["physfarm_client"], 90)),
            "plain_sync_ms": plain,
            "median_ms": {k: round(v, 4) for k, v in med.items()},
            "over_plain_sync": {k: round(v / plain, 4) for k, v in med.items()},
            "breakdown_ms": {
                "threads_over_one": round(med["plain_threaded"] - plain, 4),
                "async_over_threaded": round(med["plain_async"] - med["plain_threaded"], 4),
                "device_thread_handoff": round(med["threaded_handoff"] - med["plain_threaded"], 4),
                "actor_checks_and_bookkeeping": round(med["physfarm_actor_raw"] - med["threaded_handoff"], 4),
                "client_wrapper_over_ray": round(med["physfarm_client_over_ray"] - med["physfarm_actor_raw"], 4),
                "local_channel_over_ray_path": round(med["physfarm_client"] - med["physfarm_client_over_ray"], 4),
            },
            "in_process_us": _in_process_costs(x, theta),
            "round_trips": n,
        }
    finally:
        for a in refs.values():
            ray.kill(a)
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
    print(f"P4 round trip 256x64     {p4['ratio']:.3f} x a plain sync Ray actor's (target <= 1.10): "
          f"{p4['client_ms']:.2f} ms via DeviceClient vs {p4['plain_sync_ms']:.2f} ms; medians (ms) "
          f"{p4['median_ms']}; in-process (us) { {k: round(v, 1) for k, v in p4['in_process_us'].items()} }")
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
    write_result("P4", p4["ratio"], "ratio", "<= 1.10", p4["ratio"] <= 1.10, command,
                 {**p4, "request": "256 x 64 float32, theta[1], NullSystem (y = x)",
                  "what": "median round trip through DeviceClient.forward over a plain sync Ray actor's "
                          "(returns x) for the same payload, calls interleaved in the same run",
                  "references": {
                      "plain_sync": "@ray.remote class, def forward(x, theta): return x (one thread)",
                      "plain_threaded": f"the same with max_concurrency={RAY_THREADS} (physfarm's actor's threads)",
                      "plain_async": "the same as an async method (physfarm's serving model before issue 19)",
                      "threaded_handoff": "threaded, each request handed to one device thread and awaited",
                      "physfarm_client_over_ray": "DeviceClient(local_channel=False): every request a Ray call "
                                                  "(a trainer on another node than the device)"},
                  "before_after": BEFORE_AFTER,
                  "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(load_after, 2)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
