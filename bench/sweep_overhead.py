"""P7 and P8 (TARGETS.md): what a sweep costs beyond its trainings, and where that time goes.

P7  wall time of `physfarm sweep examples/quickstart.yaml` (a fresh process: imports, local Ray,
    MLflow store, device actor, Tune, the 4 trials, the leaderboard, Ray's shutdown) over the same
    trials trained one after another in one fresh process without Ray (imports, the simulator
    in-process, the data, the 4 trainings: `--in-process`). Runs alternate (in-process, sweep, ...) so
    load on the machine hits both alike; the figure is the median of the sweeps over the median of
    the in-process runs. Also: the time from the sweep's process start to its first trial's first
    epoch starting (target <= 10 s), and the phase table below for the median sweep.
    Beside them, the Ray floor: a bare Ray + Tune run of 4 trials doing the same imports and no work
    (`ray_floor`), and the ratio a sweep would have if only Ray's share and the trainings cost time.
P8  sweep wall time per trial with 200 one-epoch trials on tiny data over the same with 4 (the
    driver's per-trial cost, MLflow writes, Tune's bookkeeping, must not grow with the trial count).

The phase table comes from the marks every process of the sweep writes when PHYSFARM_PHASES names a
file (farm/phases.py): process start (this script's clock just before it starts the process), config
loaded, Ray ready, store and data ready (prepared), devices answering, Tune started, first trial's
worker running, first epoch starting, last epoch, Tune done, collected and finished (leaderboard,
model), and the process's exit (Ray's shutdown is the last step).

    python -m bench.sweep_overhead                 # writes bench/results/P7.json and P8.json
    python -m bench.sweep_overhead --quick         # one pair, no P8, prints only
    python -m bench.sweep_overhead --only p7       # or p8
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"

# (label, from mark, to mark): the rows of the phase table; "start" is the process start, "exit" its end
PHASES = [
    ("process start, imports, config loaded and checked", "start", "config_loaded"),
    ("Ray started (Ray Tune and MLflow imported beside it)", "config_loaded", "ray_ready"),
    ("MLflow store opened and data loaded (begun beside Ray)", "ray_ready", "prepared"),
    ("device actors answering (launched once Ray was up)", "prepared", "devices_started"),
    ("parent run opened, Tune built", "devices_started", "tune_start"),
    ("Tune start to first trial running", "tune_start", "first_trial_start"),
    ("trial start to first epoch starting", "first_trial_start", "first_trial_ready"),
    ("training: first epoch start to last epoch end", "first_trial_ready", "last_epoch"),
    ("last epoch to Tune done", "last_epoch", "tune_done"),
    ("collect and finish (leaderboard, best model)", "tune_done", "finished"),
    ("printing, Ray shutdown, exit", "finished", "exit"),
]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def _sweep(config: Path, work: Path, label: str) -> dict:
    """One `physfarm sweep` in a fresh process; its wall time and the marks of its phases."""
    phases = work / f"{label}.phases.jsonl"
    uri = f"sqlite:///{(work / f'{label}.db').resolve()}"
    cmd = [sys.executable, "-m", "farm.cli", "sweep", str(config), "--quiet", "--tracking-uri", uri]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=work, env=_env({"PHYSFARM_PHASES": str(phases)}),
                          capture_output=True, text=True)
    t1 = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"sweep failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    from farm.phases import read

    return {"wall_s": t1 - t0, "marks": _marks(read(phases), t0, t1)}


def _marks(rows: list[dict], t0: float, t1: float) -> dict:
    """The phase marks as seconds from the process start: the driver's once, the trials' first
    (first_trial_start, first_trial_ready) and the last epoch's end over all trials."""
    out = {"start": 0.0, "exit": t1 - t0}
    for r in rows:
        name = r["phase"]
        if name in ("trial_start", "trial_ready"):
            out.setdefault(f"first_{name}", r["t"] - t0)
        elif name == "epoch":
            out["last_epoch"] = r["t"] - t0
            out.setdefault("first_epoch_end", r["t"] - t0)
        elif name not in out:
            out[name] = r["t"] - t0
    return out


def _in_process_child(config: Path) -> None:
    """The sweep's trials one after another in this process, no Ray, no MLflow (run as a child by
    `_in_process`): the same trainer functions, configs, data and simulator."""
    t0 = time.time()
    from actors.systems.registry import build_system
    from farm.config import load_config
    from farm.data import load_dataset
    from farm.space import samplers, substitute
    from farm.trainspec import resolve_train
    from trainers.registry import method

    cfg = load_config(config)
    grid = samplers(cfg.train, "train")
    if any(form != "grid" for form, _ in grid.values()):
        raise SystemExit(f"{config}: --in-process runs grids only")
    data = load_dataset(cfg.data)
    devices = {d.name: build_system(dict(d.system)) for d in cfg.devices}
    t_ready = time.time()
    paths = list(grid)
    for values in itertools.product(*(args for _, args in grid.values())):
        train = resolve_train(substitute(cfg.train, dict(zip(paths, values)), "train"), list(devices))
        m = method(str(train.get("method", "pat")))
        train_cfg = m.config_class.model_validate(train)
        m.train(train_cfg, devices[train_cfg.device], data)
    print(json.dumps({"setup_s": t_ready - t0, "train_s": time.time() - t_ready}))


def _in_process(config: Path) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "bench.sweep_overhead", "--in-process-child", str(config)],
                          env=_env(), capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"in-process run failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _ray_floor_child(trials: int, epochs: int) -> None:
    """Ray's own share of a sweep (run as a child by `_ray_floor`): a local Ray started as physfarm
    starts it, a Tune run of `trials` function trials at the quickstart's 0.5 CPU each that import
    what a PAT trial imports (torch, Ray Tune, the trainers) and report `epochs` times with no work
    between, then Ray's shutdown. No MLflow, no device, no data, no training."""
    t0 = time.time()
    import ray
    from ray import tune

    from farm.raycluster import start_local, usable_cpus

    def trial(config):
        import torch  # noqa: F401 - the import a trial pays

        import trainers.pat  # noqa: F401

        for epoch in range(epochs):
            tune.report({"epoch": epoch})

    start_local(usable_cpus())
    t_ray = time.time()
    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 0.5}),
                       tune_config=tune.TuneConfig(num_samples=trials),
                       run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(prefix="ray-floor-"), verbose=0))
    tuner.fit()
    t_tune = time.time()
    ray.shutdown()
    print(json.dumps({"ray_start_s": t_ray - t0, "tune_s": t_tune - t_ray, "shutdown_s": time.time() - t_tune}))


def _ray_floor(trials: int = 4, epochs: int = 6) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "bench.sweep_overhead", "--ray-floor-child", f"{trials},{epochs}"],
                          env=_env(), capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"Ray floor run failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _phase_table(marks: dict) -> list[dict]:
    rows = []
    for label, a, b in PHASES:
        if a in marks and b in marks:
            rows.append({"phase": label, "seconds": round(marks[b] - marks[a], 2)})
    return rows


def p7(pairs: int, work: Path) -> dict:
    sweeps, local, floor = [], [], []
    for i in range(pairs):
        local.append(_in_process(QUICKSTART))
        sweeps.append(_sweep(QUICKSTART, work, f"p7-{i}"))
        floor.append(_ray_floor())
        s, loc = sweeps[-1], local[-1]
        print(f"pair {i}: in-process {loc['wall_s']:.1f} s (training {loc['train_s']:.1f} s), sweep "
              f"{s['wall_s']:.1f} s, first epoch starts at {s['marks'].get('first_trial_ready', float('nan')):.1f} s, "
              f"bare Ray + Tune {floor[-1]['wall_s']:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    t_sweep = statistics.median(s["wall_s"] for s in sweeps)
    t_local = statistics.median(x["wall_s"] for x in local)
    median_sweep = sorted(sweeps, key=lambda s: s["wall_s"])[len(sweeps) // 2]
    first_epoch = statistics.median(s["marks"].get("first_trial_ready", float("nan")) for s in sweeps)
    t_train = statistics.median(x["train_s"] for x in local)
    t_floor = statistics.median(f["wall_s"] for f in floor)
    return {"ratio": t_sweep / t_local, "sweep_s": t_sweep, "in_process_s": t_local,
            "in_process_training_s": t_train,
            # What Ray alone costs such a sweep here, and the ratio a sweep would have if everything but
            # Ray's share and the trainings themselves were free: (bare Ray + Tune + training) / in-process
            "ray_floor": {"what": "fresh process: local Ray started as physfarm does, Tune run of 4 function "
                                  "trials at 0.5 CPU importing torch and the trainers, 6 empty reports each, "
                                  "Ray shutdown (no MLflow, device, data or training); median of the runs",
                          "wall_s": t_floor, "runs": floor,
                          "floor_ratio": (t_floor + t_train) / t_local},
            "time_to_first_epoch_s": first_epoch, "phases": _phase_table(median_sweep["marks"]),
            "runs": [{"in_process": x, "sweep": {"wall_s": s["wall_s"], "marks": s["marks"]}}
                     for x, s in zip(local, sweeps)]}


def _tiny_config(work: Path, trials: int) -> Path:
    """A sweep of `trials` one-epoch PAT trials on 100 digits (seeds 0..trials-1)."""
    import yaml

    cfg = {
        "devices": [{"name": "osc", "system": {"kind": "oscillators", "seed": 0}}],
        "data": {"kind": "digits", "limit": 100},
        "train": {"method": "pat", "device": "osc", "epochs": 1, "batch_size": 64,
                  "seed": {"grid": list(range(trials))}},
        "sweep": {"name": f"p8-{trials}", "trial_cpus": 0.5},
        "tracking": {"experiment": f"p8-{trials}"},
    }
    path = work / f"p8-{trials}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def p8(work: Path, many: int = 200, few: int = 4) -> dict:
    runs = {}
    for n in (few, many, few):  # few twice around many: the load drifts
        s = _sweep(_tiny_config(work, n), work, f"p8-{n}-{len(runs)}")
        runs.setdefault(n, []).append(s)
        print(f"{n} trials: {s['wall_s']:.1f} s ({s['wall_s'] / n:.2f} s per trial)", flush=True)
    per_few = statistics.mean(s["wall_s"] for s in runs[few]) / few
    per_many = runs[many][0]["wall_s"] / many
    return {"ratio": per_many / per_few, "per_trial_s": {str(few): per_few, str(many): per_many},
            "runs": {str(n): [{"wall_s": s["wall_s"], "marks": s["marks"]} for s in v] for n, v in runs.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="alternating (in-process, sweep) pairs for P7")
    parser.add_argument("--quick", action="store_true", help="one P7 pair, print only (no JSON)")
    parser.add_argument("--only", choices=("p7", "p8"), default=None)
    parser.add_argument("--in-process-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ray-floor-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ray_floor_child:
        trials, epochs = (int(v) for v in args.ray_floor_child.split(","))
        _ray_floor_child(trials, epochs)
        return 0
    if args.in_process_child:
        _in_process_child(Path(args.in_process_child))
        return 0
    with tempfile.TemporaryDirectory(prefix="physfarm-p7-") as tmp:
        work = Path(tmp)
        res7 = p7(1 if args.quick else args.pairs, work) if args.only in (None, "p7") else None
        res8 = p8(work) if args.only in (None, "p8") and not args.quick else None
    if res7:
        print(f"P7: {res7['ratio']:.2f} (target <= 1.5): sweep {res7['sweep_s']:.1f} s, in-process "
              f"{res7['in_process_s']:.1f} s (training {res7['in_process_training_s']:.1f} s); first epoch at "
              f"{res7['time_to_first_epoch_s']:.1f} s (target <= 10 s); bare Ray + Tune {res7['ray_floor']['wall_s']:.1f} s, "
              f"floor ratio {res7['ray_floor']['floor_ratio']:.2f}")
        for row in res7["phases"]:
            print(f"  {row['phase']:<48} {row['seconds']:6.2f} s")
    if res8:
        print(f"P8: {res8['ratio']:.2f} (target <= 1.2): {res8['per_trial_s']}")
    if args.quick:
        return 0
    from bench.common import write_result

    if res7:
        met = res7["ratio"] <= 1.5 and res7["time_to_first_epoch_s"] <= 10.0
        print("  wrote", write_result("P7", res7["ratio"], "ratio", "<= 1.5 (and first epoch <= 10 s)", met,
                                      "python -m bench.sweep_overhead", {**res7, "config": "examples/quickstart.yaml"}))
    if res8:
        print("  wrote", write_result("P8", res8["ratio"], "ratio", "<= 1.2", res8["ratio"] <= 1.2,
                                      "python -m bench.sweep_overhead --only p8", res8))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
