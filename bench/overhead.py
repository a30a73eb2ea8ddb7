"""P3: Ray's overhead on simulator-bound work (TARGETS.md).

One PAT epoch (training and test evaluation, digits, oscillators at their default size) with the
device behind a real device actor (Ray, `farm.pool.start_device`, `farm.client.DeviceClient`), over
the same epoch with the simulator called in-process. Both use the same trainer, config and seed.

Two set-ups (issue 19), both reported:
  - idle core (the value): one training at a time on a 2-CPU Ray; the device actor's work runs on
    the other core. The PAT forward sends each device call without waiting and computes the twin's
    forward while it is in flight (`trainers/pat_function.py`). Runs alternate (in-process, actor
    overlapped, actor plain, ...) so machine load hits all alike; the figure is the median over
    repeats of the per-triple ratio actor / in-process (the two actor runs swap places every other
    repeat). `plain` (the device call awaited before the twin's forward, as before issue 19) is
    reported beside it: what the overlap gives.
    The client is on the device's node, so its calls take the local channel (actors/local_channel.py);
    `over Ray` (DeviceClient(local_channel=False), every call a Ray call) is reported beside it.
  - 4 trials on 2 cores (`sweep_4on2`): four trainer processes (Ray actors of 0.5 CPU each on the
    2-CPU Ray, as Tune places four trials) each train one epoch at the same time, all through the one
    device actor, over the same four trainings with each trainer calling its own simulator
    in-process. The figure is the wall time of the batch of four (the sweep's time), median over
    alternating pairs of the per-pair ratio. Here no core is idle: overlap hides little, and the
    actor's own work competes with the trainers for the 2 cores.

Measured in the same run, for reading the figure (in `details`, not the value):
  - `ray_floor`: the median round trip of a bare Ray actor that returns at once, for the same
    request (x[64, 64], theta[n_params] float32), and the ratio it alone would set without overlap:
    1 + device calls x round trip / in-process epoch.
  - `simulator_bound`: the same pairs on the `plate` simulator (default size), whose forward pass
    costs ~10x the oscillators'.

The machine's load average is recorded: other work on a shared box raises every ratio.

    python -m bench.overhead [--repeats 6] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

SYSTEM = {"kind": "oscillators", "seed": 0}
SIM_BOUND = {"kind": "plate", "seed": 0}
TRAIN = {"method": "pat", "epochs": 1, "batch_size": 64, "lr": 0.02, "seed": 0, "torch_threads": 1}


def _epoch(device, data) -> tuple[float, dict]:
    from trainers.config import PATConfig
    from trainers.pat import train_pat

    t0 = time.perf_counter()
    result = train_pat(PATConfig.model_validate(TRAIN), device, data)
    return time.perf_counter() - t0, result.history[-1]


class _NoSubmit:
    """A device handle without `submit`: the trainer then waits for each device call before the
    twin's forward (the plain order, before issue 19), for the comparison in `details`."""

    def __init__(self, device):
        self._device = device

    @property
    def spec(self):
        return self._device.spec

    def forward(self, x, theta):
        return self._device.forward(x, theta)

    def ideal_model(self):
        return self._device.ideal_model()


def _pairs(system: dict, name: str, data, repeats: int, plain: bool = True) -> list[dict]:
    """Alternating one-epoch trainings on `system`: in-process, actor (overlapped), actor (plain)."""
    from actors.systems.registry import build_system
    from farm.client import DeviceClient
    from farm.config import DeviceConfig
    from farm.pool import start_device, stop_device
    from trainers.metering import MeteredDevice

    handles = start_device(DeviceConfig(name=name, system=dict(system)))  # noqa: F841 - keeps it alive
    try:
        client = DeviceClient(name, client_id=f"bench-p3/{name}").connect()  # over the local channel
        over_ray = DeviceClient(name, client_id=f"bench-p3-ray/{name}", local_channel=False).connect()
        local = MeteredDevice(build_system(dict(system)))  # times its own forward calls
        _epoch(local, data), _epoch(client, data), _epoch(_NoSubmit(client), data)  # warm-up
        if plain:
            _epoch(over_ray, data)
        pairs = []
        for i in range(repeats):
            local.seconds = 0.0
            t_local, h_local = _epoch(local, data)
            if plain and i % 2:  # the two actor runs swap places every other repeat: no order bias
                t_plain, _ = _epoch(_NoSubmit(client), data)
            busy0 = client.stats()["busy_s"]
            t_actor, h_actor = _epoch(client, data)
            busy = client.stats()["busy_s"] - busy0
            pair = {"in_process_s": round(t_local, 4), "actor_s": round(t_actor, 4), "ratio": t_actor / t_local,
                    "in_process_device_s": round(local.seconds, 4), "actor_busy_s": round(busy, 4),
                    "load_avg_1m": round(os.getloadavg()[0], 2), "device_calls": h_actor["device_calls"],
                    "device_rows": h_actor["device_rows"],
                    "test_accuracy_in_process": h_local["test_accuracy"],
                    "test_accuracy_actor": h_actor["test_accuracy"]}
            if plain:
                if not i % 2:
                    t_plain, _ = _epoch(_NoSubmit(client), data)
                t_ray, _ = _epoch(over_ray, data)
                pair.update(actor_plain_s=round(t_plain, 4), ratio_plain=t_plain / t_local,
                            actor_over_ray_s=round(t_ray, 4), ratio_over_ray=t_ray / t_local)
            pairs.append(pair)
            print(f"{system['kind']} {i}: in-process {t_local:.3f} s (device {local.seconds:.3f} s), actor "
                  f"{t_actor:.3f} s (busy {busy:.3f} s), ratio {t_actor / t_local:.3f}"
                  + (f", plain {pair['ratio_plain']:.3f}, over Ray {pair['ratio_over_ray']:.3f}" if plain else "") + f", load {os.getloadavg()[0]:.1f}")
        return pairs
    finally:
        stop_device(name)


def _sweep_4on2(system: dict, name: str, repeats: int, trials: int = 4) -> dict:
    """`trials` trainer processes training one epoch each at once, through one device actor, over the
    same with each calling its own simulator in-process; alternating, median of per-pair ratios."""
    import ray

    from farm.config import DeviceConfig
    from farm.pool import start_device, stop_device

    @ray.remote(num_cpus=0.5)  # four of them fill the 2-CPU Ray, as four Tune trials would
    class Trainer:
        def __init__(self, device_name: str, system: dict, k: int):
            import torch

            from actors.systems.registry import build_system
            from farm.client import DeviceClient
            from farm.data import DataConfig, load_dataset

            torch.set_num_threads(1)
            self.data = load_dataset(DataConfig(kind="digits"))
            self.local = build_system(dict(system))
            self.client = DeviceClient(device_name, client_id=f"bench-p3-sweep/{k}").connect()

        def epoch(self, where: str) -> float:
            return _epoch(self.client if where == "actor" else self.local, self.data)[0]

    handles = start_device(DeviceConfig(name=name, system=dict(system)))  # noqa: F841 - keeps it alive
    trainers = [Trainer.remote(name, dict(system), k) for k in range(trials)]
    try:
        ray.get([t.epoch.remote(w) for t in trainers for w in ("in_process", "actor")])  # warm-up

        def batch(where: str) -> tuple[float, list[float]]:
            t0 = time.perf_counter()
            each = ray.get([t.epoch.remote(where) for t in trainers])
            return time.perf_counter() - t0, each

        stats = handles[0].stats
        pairs = []
        for i in range(repeats):
            t_local, each_local = batch("in_process")
            s0 = ray.get(stats.remote())
            t_actor, each_actor = batch("actor")
            s1 = ray.get(stats.remote())
            calls = s1["calls"] - s0["calls"]
            pairs.append({"in_process_s": round(t_local, 4), "actor_s": round(t_actor, 4),
                          "ratio": t_actor / t_local, "actor_busy_s": round(s1["busy_s"] - s0["busy_s"], 4),
                          "actor_calls": calls,
                          "rows_per_call": round((s1["rows"] - s0["rows"]) / calls, 1) if calls else 0.0,
                          "per_trial_in_process_s": [round(v, 4) for v in each_local],
                          "per_trial_actor_s": [round(v, 4) for v in each_actor],
                          "load_avg_1m": round(os.getloadavg()[0], 2)})
            print(f"sweep {trials} on 2 cores {i}: in-process {t_local:.3f} s, actor {t_actor:.3f} s "
                  f"(busy {pairs[-1]['actor_busy_s']:.3f} s, {calls} calls of {pairs[-1]['rows_per_call']} rows), "
                  f"ratio {t_actor / t_local:.3f}, load {os.getloadavg()[0]:.1f}")
        return {"ratio": statistics.median(p["ratio"] for p in pairs), "trials": trials,
                "trainers": "Ray actors of 0.5 CPU on a 2-CPU Ray, torch 1 thread each",
                "what": "wall time of the batch of trials (each one epoch) through the one device actor, over "
                        "the same batch with each trainer calling its own simulator in-process",
                "merging": "the actor merges the trials' requests into calls of up to max_rows rows; requests with "
                           "different thetas make a per-row-theta call, which for the oscillators costs ~4x the "
                           "same rows in shared-theta calls (256 rows: 73 ms mixed vs 4 x 64 shared 17.6 ms, 1 "
                           "thread, measured once): actor_busy_s shows it. Behaviour defined by "
                           "tests/test_shared_theta.py, left as is (issue 19 follow-up)",
                "pairs": pairs}
    finally:
        for t in trainers:
            ray.kill(t)
        stop_device(name)


def _ray_round_trip_ms(n_params: int, repeats: int = 200) -> float:
    """Median round trip (ms) of a bare async Ray actor that returns at once, for one request of the
    bench's size: what Ray itself costs per device call here."""
    import numpy as np
    import ray

    @ray.remote(num_cpus=0)
    class Echo:
        async def forward(self, x, theta, client):
            return x[:, :10].copy()

    echo = Echo.remote()
    x, theta = np.zeros((64, 64), np.float32), np.zeros(n_params, np.float32)
    ray.get(echo.forward.remote(x, theta, "p3"))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ray.get(echo.forward.remote(x, theta, "p3"))
        times.append(time.perf_counter() - t0)
    ray.kill(echo)
    return 1000 * statistics.median(times)


def _summary(pairs: list[dict]) -> dict:
    calls = pairs[0]["device_calls"]
    t_local = statistics.median(p["in_process_s"] for p in pairs)
    t_actor = statistics.median(p["actor_s"] for p in pairs)
    plain = ({"ratio_plain": statistics.median(p["ratio_plain"] for p in pairs),
              "ratio_over_ray": statistics.median(p["ratio_over_ray"] for p in pairs)}
             if "ratio_plain" in pairs[0] else {})
    return {"ratio": statistics.median(p["ratio"] for p in pairs), **plain, "device_calls": calls,
            "in_process_s": t_local, "actor_s": t_actor,
            "in_process_device_share": round(statistics.median(p["in_process_device_s"] / p["in_process_s"]
                                                               for p in pairs), 3),
            "extra_ms_per_device_call": round(1000 * (t_actor - t_local) / max(1, calls), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6, help="rounds of epochs (median of ratios; even: "
                        "each order of the two actor runs as often)")
    parser.add_argument("--quick", action="store_true", help="2 pairs, print only (no JSON)")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats

    import ray
    import torch

    from actors.systems.registry import build_system
    from farm.data import DataConfig, load_dataset
    from farm.pool import NAMESPACE

    torch.set_num_threads(1)
    data = load_dataset(DataConfig(kind="digits"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    try:
        load_before = os.getloadavg()[0]
        pairs = _pairs(SYSTEM, "p3-oscillators", data, repeats)
        rtt_ms = _ray_round_trip_ms(build_system(dict(SYSTEM)).spec.n_params)
        sweep = _sweep_4on2(SYSTEM, "p3-sweep", repeats)
        bound = _pairs(SIM_BOUND, "p3-plate", data, max(2, repeats // 2 + 1), plain=False)
        load_after = os.getloadavg()[0]
    finally:
        ray.shutdown()
    main_summary, bound_summary = _summary(pairs), _summary(bound)
    value = main_summary["ratio"]
    met = value <= 1.15
    floor = 1 + main_summary["device_calls"] * rtt_ms / 1000 / main_summary["in_process_s"]
    print(f"P3: {value:.3f} on an idle core (target <= 1.15, {'met' if met else 'MISSED'}; without the overlap "
          f"{main_summary['ratio_plain']:.3f}); 4 trials on 2 cores: {sweep['ratio']:.3f}; "
          f"{main_summary['device_calls']} device calls per epoch, {main_summary['extra_ms_per_device_call']:.2f} ms "
          f"extra per call; a bare Ray round trip is {rtt_ms:.2f} ms (floor ratio without overlap {floor:.3f}); "
          f"simulator-bound (plate): {bound_summary['ratio']:.3f}")
    if not args.quick:
        from bench.common import write_result

        path = write_result("P3", value, "ratio", "<= 1.15", met, "python -m bench.overhead", {
            "setup": "idle core: one training at a time, the device actor on the other core; PAT's device "
                     "call overlapped with the twin's forward",
            "pairs": pairs, "median_over": "alternating (in-process, actor, actor plain) one-epoch trainings",
            **main_summary,
            "overlap_gain": {"ratio_overlapped": round(main_summary["ratio"], 4),
                             "ratio_plain": round(main_summary["ratio_plain"], 4),
                             "what": "plain: the device call awaited before the twin's forward (before issue 19)"},
            "local_channel_gain": {"ratio_local_channel": round(main_summary["ratio"], 4),
                                   "ratio_over_ray": round(main_summary["ratio_over_ray"], 4),
                                   "what": "over Ray: the same overlapped trainer with DeviceClient(local_channel="
                                           "False), every device call a Ray call (a trainer on another node)"},
            "sweep_4on2": sweep,
            "system": SYSTEM, "train": TRAIN, "data": {"kind": "digits"},
            "ray": {"num_cpus": 2, "device_actor_num_cpus": 0},
            "ray_floor": {"bare_round_trip_ms": round(rtt_ms, 3), "floor_ratio": round(floor, 3),
                          "what": "1 + device calls x bare Ray round trip / in-process epoch (without overlap)"},
            "simulator_bound": {"system": SIM_BOUND, **bound_summary, "pairs": bound},
            "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(load_after, 2),
            "note": "ratios of wall times on a 2-core machine; the oscillators' forward pass is cheap "
                    "(~1.5 ms per 64-row call), so the epoch is mostly the trainer's own compute and Ray's "
                    "fixed per-call cost weighs in",
        })
        print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
