"""P6: the README's main job from a cold start (TARGETS.md: <= 3 min on 2 cores).

The job is what `make demo` runs: `physfarm sweep examples/quickstart.yaml` (a local Ray started by the
command, one simulated device, a 4-trial PAT grid, MLflow in ./mlflow.db). It is timed in a fresh
`git clone` of this checkout's HEAD, so nothing is warm: no Ray running, no MLflow store, no results.

    python -m bench.demo                  # the job, with this checkout's .venv (the value)
    python -m bench.demo --with-install   # also `make demo` in a second fresh clone: venv + install + job

The value is the job's wall time; with --with-install, the whole `make demo` (creating .venv and
installing into it, then the job) is measured too and written to the details.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import sweep_env

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 180.0


def _clone(into: Path) -> Path:
    dest = into / "physfarm"
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True, timeout=120)
    return dest


def _timed(cmd: list[str], cwd: Path, timeout_s: float) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=sweep_env(), capture_output=True, text=True, timeout=timeout_s)
    return time.monotonic() - t0, proc


def _leaderboard(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("rank")), None)
    return [] if start is None else [line for line in lines[start:start + 5] if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--with-install", action="store_true",
                        help="also time `make demo` in a fresh clone with no .venv (installs everything)")
    parser.add_argument("--quick", action="store_true", help="print only (no JSON)")
    args = parser.parse_args(argv)

    details: dict = {"job": "physfarm sweep examples/quickstart.yaml in a fresh clone (what `make demo` runs)"}
    with tempfile.TemporaryDirectory(prefix="physfarm-p6-") as tmp:
        clone = _clone(Path(tmp) / "job")
        # `python -m farm.cli` from the clone's folder: the clone's code, this checkout's installed packages
        wall, proc = _timed([sys.executable, "-m", "farm.cli", "sweep", "examples/quickstart.yaml"], clone, 900)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the demo job failed with exit code {proc.returncode}")
        details.update(job_s=round(wall, 1), leaderboard=_leaderboard(proc.stdout),
                       mlflow_db=(clone / "mlflow.db").is_file())
        print(f"job: {wall:.1f} s")
        for line in details["leaderboard"]:
            print("  " + line)
        if args.with_install:
            fresh = _clone(Path(tmp) / "install")
            total, proc = _timed(["make", "demo"], fresh, 1800)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"make demo failed with exit code {proc.returncode}")
            found = re.search(r"MLflow: experiment", proc.stdout) is not None
            details.update(make_demo_with_install_s=round(total, 1), make_demo_printed_mlflow_line=found)
            print(f"make demo in a clone without .venv (install + job): {total:.1f} s")
    value = details["job_s"]
    met = value <= TARGET_S
    print(f"P6: {value:.1f} s (target <= {TARGET_S:.0f} s, {'met' if met else 'MISSED'})")
    if not args.quick:
        from bench.common import write_result

        cmd = "python -m bench.demo" + (" --with-install" if args.with_install else "")
        print(f"  wrote {write_result('P6', value, 's', '<= 3 min on 2 cores', met, cmd, details)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
