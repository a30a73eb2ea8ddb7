"""Cost of the simulators themselves: seconds per device call and rows per second at batch 1, 64 and
256 (median of repeats), default configs (mismatch and noise on, latency off), one parameter vector
per row as the device actor sends them. Also a recorded device (fit from simulator data) and an
instrument (shg behind a loopback server), to show what replay and the network add.

    python -m bench.systems [--threads 1] [--repeats 7] [--only plate circuit]

Writes bench/results/systems.json (value: the slowest simulator's 256-row call, in ms).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actors.systems.registry import build_system
from bench.common import write_result

SIMULATORS = ["oscillators", "shg", "plate", "circuit", "cavity"]
EXTRAS = ["recorded", "instrument"]
BATCHES = (1, 64, 256)
TARGET_MS = 100.0  # "a 256-row call takes at most tens of ms"


def _recorded_config(tmp: Path) -> dict:
    sim = build_system({"kind": "cavity", "n_inputs": 12, "n_params": 4, "n_outputs": 16, "seed": 1})
    gen = torch.Generator().manual_seed(0)
    x, theta = torch.rand(2000, 12, generator=gen), torch.rand(2000, 4, generator=gen)
    y = sim.forward(x, theta)
    path = tmp / "rows.npz"
    np.savez(path, controls=torch.cat([x, theta], 1).numpy(), responses=y.numpy())
    return {"kind": "recorded", "path": str(path), "n_inputs": 12, "n_params": 4, "n_outputs": 16,
            "input_range": (0, 1), "param_range": (0, 1), "epochs": 300}


def bench_system(system, repeats: int) -> dict:
    spec = system.spec
    gen = torch.Generator().manual_seed(0)
    out = {}
    (xl, xh), (pl, ph) = spec.input_range, spec.param_range
    for rows in BATCHES:
        x = xl + (xh - xl) * torch.rand(rows, spec.n_inputs, generator=gen)
        theta = (pl + (ph - pl) * torch.rand(spec.n_params, generator=gen)).expand(rows, -1).contiguous()
        system.forward(x, theta)  # warm-up
        times = []
        budget_end = time.perf_counter() + 20.0  # keep a slow system from stalling the run
        for _ in range(repeats):
            t0 = time.perf_counter()
            system.forward(x, theta)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() > budget_end and len(times) >= 3:
                break
        med = statistics.median(times)
        out[str(rows)] = {"s_per_call": med, "rows_per_s": rows / med, "repeats": len(times),
                          "min_s": min(times), "max_s": max(times)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1, as in a Ray worker: OMP_NUM_THREADS=1)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", nargs="*", default=None, help="subset of systems")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.only or SIMULATORS + EXTRAS
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        for name in names:
            if name == "recorded":
                system = build_system(_recorded_config(Path(tmp)))
                system.connect()  # the fit is not part of a call
            elif name == "instrument":
                from actors.instrument.server import InstrumentServer

                server = InstrumentServer({"kind": "shg"}, port=0, log=lambda msg: None)
                _, port = server.start()
                system = build_system({"kind": "instrument", "port": port})
            else:
                system = build_system({"kind": name})
            spec = system.spec
            r = bench_system(system, args.repeats)
            r["sizes"] = {"n_inputs": spec.n_inputs, "n_params": spec.n_params, "n_outputs": spec.n_outputs}
            if name == "recorded":
                r["holdout_relative_rmse"] = system.info.get("holdout_relative_rmse")
            results[name] = r
            system.close()
            print(f"{name:12s} " + "  ".join(
                f"B={b:>3}: {r[str(b)]['s_per_call'] * 1e3:8.2f} ms/call {r[str(b)]['rows_per_s']:10.0f} rows/s"
                for b in BATCHES), flush=True)
        if server is not None:
            server.stop()
    sims = [n for n in names if n in SIMULATORS]
    worst = max((results[n]["256"]["s_per_call"] * 1e3 for n in sims), default=float("nan"))
    worst_name = max(sims, key=lambda n: results[n]["256"]["s_per_call"]) if sims else None
    command = "python -m bench.systems" + (f" --threads {args.threads}" if args.threads != 1 else "")
    path = write_result(
        "systems", worst, "ms", f"every simulator <= {TARGET_MS:.0f} ms per 256-row call (tens of ms)",
        bool(worst <= TARGET_MS), command,
        {"slowest": worst_name, "threads": args.threads, "batches": list(BATCHES), "systems": results,
         "note": "default configs (mismatch, noise on; latency off); theta one vector per row; median of "
                 "repeats; instrument = shg over a loopback TCP server; recorded = MLP fit of cavity data"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
