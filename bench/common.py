"""Shared by the bench scripts: one JSON per figure in bench/results/<id>.json (TARGETS.md).

    from bench.common import write_result
    write_result("P4", 1.3, "ms", "<= 2 ms", True, "python -m bench.overhead", {"runs": [...]})

writes {id, value, unit, target, met, command, machine, details}; `machine` says what ran it
(cores, CPU, Python, platform, torch, the script's argv).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What ran a benchmark: enough to judge whether two results are comparable."""
    info = {"cores": os.cpu_count(), "cpu": _cpu_model(), "python": sys.version.split()[0],
            "platform": platform.platform(), "ran": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other work on the box skews timings
    except OSError:
        pass
    return info


def write_result(id: str, value: float, unit: str, target: str, met: bool, command: str,
                 details: dict | None = None) -> Path:
    """Write bench/results/<id>.json with keys id, value, unit, target, met, command, machine, details."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"id": id, "value": float(value), "unit": unit, "target": target, "met": bool(met),
              "command": command, "machine": machine(), "details": details or {}}
    path = RESULTS / f"{id}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sweep_env() -> dict:
    """Environment for a `physfarm` subprocess a bench times: none of this shell's Ray or MLflow
    settings (a cluster address, a tracking URI), and RAY_ADDRESS=local so that it starts its own Ray
    instead of joining another one on this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["RAY_ADDRESS"] = "local"
    return env
