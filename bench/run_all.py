"""`make bench`: regenerate every figure in bench/results/ (each script also runs alone)."""
from __future__ import annotations

import sys

from . import chaos, demo, fidelity, learning, load, overhead, scaling, serving, sharing, sweep_overhead, systems

# load (R-load-errors, 60 s) and chaos (R-lost, every fault scenario) last: they take the longest.
SCRIPTS = [("systems", systems.main), ("serving", serving.main), ("overhead", overhead.main),
           ("sweep_overhead", sweep_overhead.main),
           ("scaling", scaling.main), ("demo", demo.main), ("sharing", sharing.main),
           ("learning", learning.main), ("fidelity", fidelity.main), ("load", load.main), ("chaos", chaos.main)]


def main() -> int:
    failed = []
    for name, run in SCRIPTS:
        print(f"== bench.{name}", flush=True)
        if run([]) not in (0, None):
            failed.append(name)
    if failed:
        print(f"bench scripts that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
