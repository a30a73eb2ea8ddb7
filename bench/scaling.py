"""P5: sweep scaling (TARGETS.md): trials per hour with R simulator replicas on R cores, over R x the
trials per hour of one replica on one core (>= 0.8).

Each run is a real `physfarm sweep` (CLI subprocess, its own local Ray, MLflow in a SQLite file)
pinned with `taskset` to R cores (the local Ray offers exactly those: `farm.sweep.usable_cpus`), on a
device of R `oscillators` replicas, with the same trials: a grid of PAT trainings on digits, one
CPU each. Trials per hour are counted from the trials' own MLflow runs (first start to last end), so
Ray's start-up is not in them.

    python -m bench.scaling [--trials 4] [--quick]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import sweep_env

REPO = Path(__file__).resolve().parents[1]


def _config(root: Path, replicas: int, trials: int, epochs: int) -> Path:
    raw = {
        "devices": [{"name": "osc", "replicas": replicas, "system": {"kind": "oscillators", "seed": 0}}],
        "data": {"kind": "digits"},
        "train": {"method": "pat", "epochs": epochs, "batch_size": 32, "lr": 0.02,
                  "seed": {"grid": list(range(trials))}},
        "sweep": {"name": f"p5-r{replicas}", "trial_cpus": 1, "storage_path": str(root / "ray_results")},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": f"p5-r{replicas}"},
    }
    path = root / f"p5-r{replicas}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(replicas: int, cores: list[int], trials: int, epochs: int) -> dict:
    """One sweep on `replicas` replicas, pinned to `cores`; its trials' throughput."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix=f"physfarm-p5-r{replicas}-") as tmp:
        root = Path(tmp)
        path = _config(root, replicas, trials, epochs)
        t0 = time.monotonic()
        proc = subprocess.run(["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-m", "farm.cli",
                               "sweep", str(path), "--quiet"], cwd=REPO, env=sweep_env(), capture_output=True,
                              text=True, timeout=1800)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"sweep with {replicas} replicas failed ({proc.returncode}): {proc.stderr[-2000:]}")
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        exp = client.get_experiment_by_name(f"p5-r{replicas}")
        runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("physfarm.kind") == "trial"]
        finished = [r for r in runs if r.info.status == "FINISHED"]
        span_s = (max(r.info.end_time for r in finished) - min(r.info.start_time for r in finished)) / 1000
    return {"replicas": replicas, "cores": cores, "trials": trials, "finished": len(finished),
            "trials_span_s": round(span_s, 2), "sweep_wall_s": round(wall, 1),
            "trials_per_hour": round(3600 * len(finished) / span_s, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="trials per sweep (default 4)")
    parser.add_argument("--epochs", type=int, default=15, help="epochs per trial (default 15)")
    parser.add_argument("--quick", action="store_true", help="2 trials of 1 epoch, print only (no JSON)")
    args = parser.parse_args(argv)
    trials, epochs = (2, 1) if args.quick else (args.trials, args.epochs)
    cores = sorted(os.sched_getaffinity(0))
    r = len(cores)
    if r < 2:
        print("P5 needs at least 2 cores to compare", file=sys.stderr)
        return 1
    one = run(1, cores[:1], trials, epochs)
    print(f"1 replica on 1 core: {one['trials_per_hour']} trials/h ({one['finished']} trials in {one['trials_span_s']} s)")
    many = run(r, cores, trials, epochs)
    print(f"{r} replicas on {r} cores: {many['trials_per_hour']} trials/h ({many['finished']} trials in "
          f"{many['trials_span_s']} s)")
    value = many["trials_per_hour"] / (r * one["trials_per_hour"])
    met = value >= 0.8
    print(f"P5: {value:.3f} (target >= 0.8, {'met' if met else 'MISSED'})")
    if not args.quick:
        from bench.common import write_result

        print("  wrote", write_result("P5", value, "fraction of linear scaling", ">= 0.8", met,
                                      "python -m bench.scaling", {
                                          "one_replica": one, "r_replicas": many, "R": r,
                                          "what": "trials/hour with R replicas on R cores / (R x trials/hour with "
                                                  "1 replica on 1 core); cores pinned with taskset; trials/hour "
                                                  "from the trials' MLflow runs (first start to last end)",
                                          "trial": {"method": "pat", "system": "oscillators (64)", "epochs": epochs,
                                                    "data": "digits (all 1797)", "trial_cpus": 1}}))
    return 0 if all(x["finished"] == trials for x in (one, many)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
