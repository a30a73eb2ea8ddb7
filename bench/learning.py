"""Learning figures (TARGETS.md, "Learning"): trainings run in-process on local simulators, accuracy
measured on the device (the mismatched, noisy simulator), one JSON per figure in bench/results/.

    python -m bench.learning                 # every case
    python -m bench.learning --only L5-vowels L8
    python -m bench.learning --quick         # a smoke run: few epochs, one seed, prints, writes nothing

The cases form a table (`CASES`); each names the function that runs it (one per method / kind of
figure), so new rows (e.g. PAT's) are a case plus, where needed, a function.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VOWELS = REPO.parent / "shared" / "data" / "vowels_hillenbrand_women.csv"
NOMINAL_DRIFT = 1.0  # SimConfig.drift: 1.0 is the documented drift rate of the system (PHYSICS.md)
STRESS_DRIFT = (10.0,)  # extra drift levels reported in L8's details (x nominal)


@dataclass(frozen=True)
class Case:
    id: str  # result id (TARGETS.md)
    what: str
    run: Callable[["Case", argparse.Namespace], dict]  # -> {"value", "met", "details"}
    target: str  # as written in TARGETS.md
    threshold: float
    system: dict = field(default_factory=dict)  # simulator config (kind + knobs)
    data: dict = field(default_factory=dict)  # farm.data.DataConfig fields
    train: dict = field(default_factory=dict)  # trainer config fields (method included)
    seeds: tuple[int, ...] = (0, 1, 2)  # trainer seeds; the value is the median over them
    unit: str = "fraction"


# ---- shared helpers ----------------------------------------------------------------------------------
def load_data(case: Case, args: argparse.Namespace):
    from farm.data import DataConfig, load_dataset

    cfg = dict(case.data)
    if cfg.get("kind") == "vowels" and not cfg.get("path"):
        cfg["path"] = str(args.vowels)
    return load_dataset(DataConfig(**cfg))


def build_device(system: dict):
    from actors.systems.registry import build_system

    return build_system(dict(system))


def trainer_config(case: Case, seed: int, quick: bool, **overrides):
    from trainers.registry import method

    train = {**case.train, "seed": seed, **overrides}
    if quick:
        train["epochs"] = min(int(train.get("epochs", 5)), 2)
    m = method(train["method"])
    return m, m.config_class.model_validate(train)


def train_once(case: Case, args: argparse.Namespace, seed: int, system: dict | None = None) -> dict:
    """One training on a fresh device; returns its figures (accuracy measured on the device)."""
    data = load_data(case, args)
    device = build_device(system or case.system)
    m, cfg = trainer_config(case, seed, args.quick)
    t0 = time.monotonic()
    result = m.train(cfg, device, data)
    last = result.history[-1]
    return {
        "seed": seed,
        "test_accuracy": result.test_accuracy,
        "train_accuracy": result.train_accuracy,
        "epochs": result.epochs,
        "wall_s": round(time.monotonic() - t0, 2),
        "device_calls_per_epoch": last.get("device_calls"),
        "device_calls_train_per_epoch": last.get("device_calls_train"),
        "device_rows_per_epoch": last.get("device_rows"),
        "test_accuracy_by_epoch": [round(h["test_accuracy"], 4) for h in result.history],
        "_result": result,
        "_device": device,
        "_data": data,
    }


def _public(run: dict) -> dict:
    return {k: v for k, v in run.items() if not k.startswith("_")}


def _seeds(case: Case, args: argparse.Namespace) -> tuple[int, ...]:
    return case.seeds[:1] if args.quick else case.seeds


# ---- one function per method / figure ----------------------------------------------------------------
def phyll_accuracy(case: Case, args: argparse.Namespace) -> dict:
    """PhyLL test accuracy on the device, median over trainer seeds."""
    runs = [train_once(case, args, seed) for seed in _seeds(case, args)]
    value = statistics.median(r["test_accuracy"] for r in runs)
    return {"value": value, "met": value >= case.threshold,
            "details": {"runs": [_public(r) for r in runs], "median_over": "trainer seeds",
                        "system": case.system, "data": case.data, "train": case.train}}


def _drift_pairs(case: Case, args: argparse.Namespace, level: float) -> list[dict]:
    """Per trainer seed: the same training without drift and with drift at `level` x the nominal rate,
    plus a control: the drift-trained network, frozen, re-evaluated after the device drifted as long
    again (what the drift does to a network that stops learning)."""
    from trainers.phyll import PhyLLNet, predict

    pairs = []
    for seed in _seeds(case, args):
        still = train_once(case, args, seed, {**case.system, "drift": 0.0})
        drifting = train_once(case, args, seed, {**case.system, "drift": level})
        device, data, result = drifting["_device"], drifting["_data"], drifting["_result"]
        _, cfg = trainer_config(case, seed, args.quick)
        net = PhyLLNet(device.spec, cfg, data.n_features, data.n_classes, torch.Generator().manual_seed(seed))
        net.load_state_dict(result.state["model"])
        calls = device.calls  # the drift clock counts calls: drift as many calls again
        idle = torch.full((1, device.spec.n_inputs), device.spec.input_range[0])
        theta = torch.zeros(device.spec.n_params)
        for _ in range(calls):
            device.forward(idle, theta)
        rows = min(device.spec.max_rows, cfg.eval_batch_size)
        frozen = float((predict(net, device, data.x_test, rows) == data.y_test).float().mean())
        pairs.append({"seed": seed, "drift_level": level, "no_drift": _public(still), "drift": _public(drifting),
                      "drop": still["test_accuracy"] - drifting["test_accuracy"],
                      "frozen_after_drift_test_accuracy": frozen, "frozen_extra_drift_calls": calls})
    return pairs


def phyll_drift(case: Case, args: argparse.Namespace) -> dict:
    """L8: median over trainer seeds of (accuracy without drift - accuracy with the device drifting at
    its nominal rate), both on the device; PhyLL re-measures every epoch and needs no twin. Details
    add the same at STRESS_DRIFT x the nominal rate (not the figure; shows where tracking stops)."""
    pairs = _drift_pairs(case, args, NOMINAL_DRIFT)
    value = statistics.median(p["drop"] for p in pairs)
    stress = {}
    for level in ([] if args.quick else STRESS_DRIFT):
        sp = _drift_pairs(case, args, level)
        stress[str(level)] = {
            "median_drop": statistics.median(p["drop"] for p in sp),
            "median_frozen_test_accuracy": statistics.median(p["frozen_after_drift_test_accuracy"] for p in sp),
            "pairs": sp,
        }
    return {"value": value, "met": value <= case.threshold,
            "details": {"pairs": pairs, "median_over": "trainer seeds (paired)",
                        "drift_level": NOMINAL_DRIFT,
                        "median_no_drift_test_accuracy": statistics.median(p["no_drift"]["test_accuracy"] for p in pairs),
                        "median_drift_test_accuracy": statistics.median(p["drift"]["test_accuracy"] for p in pairs),
                        "median_frozen_test_accuracy": statistics.median(p["frozen_after_drift_test_accuracy"]
                                                                         for p in pairs),
                        "device_calls_per_epoch": pairs[0]["drift"]["device_calls_per_epoch"],
                        "device_calls_train_per_epoch": pairs[0]["drift"]["device_calls_train_per_epoch"],
                        "device_rows_per_epoch": pairs[0]["drift"]["device_rows_per_epoch"],
                        "twin": "none (PhyLL)", "stress": stress,
                        "system": case.system, "data": case.data, "train": case.train}}


# ---- the table ----------------------------------------------------------------------------------------
CAVITY = {"kind": "cavity", "seed": 0, "n_inputs": 64, "n_outputs": 256}  # default mismatch and noise

PHYLL_TRAIN = {"method": "phyll", "n_blocks": 2, "batch_size": 32, "lr": 0.01, "inner_steps": 1,
               "alpha": 4.0, "skip": False}

CASES: list[Case] = [
    Case("L5-vowels", "PhyLL, cavity, vowels", phyll_accuracy, ">= 0.90", 0.90,
         system=CAVITY, data={"kind": "vowels"}, train={**PHYLL_TRAIN, "epochs": 10}),
    Case("L5-digits", "PhyLL, cavity, digits", phyll_accuracy, ">= 0.90", 0.90,
         system=CAVITY, data={"kind": "digits"}, train={**PHYLL_TRAIN, "epochs": 6}),
    Case("L8", "PhyLL accuracy drop under drift vs no drift, cavity, digits", phyll_drift, "<= 0.02", 0.02,
         system=CAVITY, data={"kind": "digits"}, train={**PHYLL_TRAIN, "epochs": 6}),
]

from bench.pat_cases import pat_cases  # noqa: E402  (the PAT / in-silico rows: L1-L4, L6, L7)

CASES += pat_cases(Case)


def command(args: argparse.Namespace, case_id: str) -> str:
    cmd = f"python -m bench.learning --only {case_id}"
    if args.vowels != DEFAULT_VOWELS:
        cmd += f" --vowels {args.vowels}"
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these case ids")
    parser.add_argument("--quick", action="store_true", help="smoke run: <= 2 epochs, one seed, no JSON")
    parser.add_argument("--vowels", type=Path, default=DEFAULT_VOWELS, help="vowels CSV path")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    known = {c.id: c for c in CASES}
    if args.only:
        unknown = [i for i in args.only if i not in known]
        if unknown:
            parser.error(f"unknown case id(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    cases = [known[i] for i in args.only] if args.only else CASES
    for case in cases:
        if case.data.get("kind") == "vowels" and not args.vowels.is_file():
            print(f"{case.id}: skipped, vowels CSV not found at {args.vowels}", file=sys.stderr)
            continue
        t0 = time.monotonic()
        out = case.run(case, args)
        wall = time.monotonic() - t0
        out["details"]["wall_s"] = round(wall, 1)
        status = "met" if out["met"] else "MISSED"
        print(f"{case.id}: {out['value']:.4f} (target {case.target}, {status}) [{wall:.0f} s] {case.what}")
        if not args.quick:
            from bench.common import write_result

            path = write_result(case.id, out["value"], case.unit, case.target, out["met"],
                                command(args, case.id), out["details"])
            print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
