"""Learning figures (TARGETS.md, "Learning"): trainings run in-process on local simulators, accuracy
measured on the device (the mismatched, noisy simulator), one JSON per figure in bench/results/.

    python -m bench.learning                 # every case
    python -m bench.learning --only L5-vowels L8
    python -m bench.learning --quick         # a smoke run: few epochs, one seed, prints, writes nothing

The cases form a table (`CASES`); each names the function that runs it (one per method / kind of
figure), so new rows (e.g. PAT's) are a case plus, where needed, a function.

Protocol (TARGETS.md: every choice on validation, the test split opened once, by the final run):

1. Selection. Each case's settings are chosen among its `candidates` (the operating point written in
   the case, plus neighbours: at least the learning rate x 0.5 and x 2). Every candidate is trained
   with trainer seed 0 and `final_test: false`, so no candidate ever reads the test split; the
   candidate whose selected checkpoint (the trainer's best validation epoch) has the highest
   validation accuracy wins; ties go to the operating point, then to the earlier candidate.
2. Figure. The chosen settings are trained with every seed of the case with the test pass on; each
   trainer measures the test split once, on its best-validation checkpoint; the figure is the median
   over seeds, as before.

Each JSON's details hold the selection table (every candidate with its validation accuracy and
selected epoch, no test number), the chosen settings, the per-run results (`val_accuracy_by_epoch`,
`selected_epoch`, `test_accuracy`) and `previous`: the value and met of the JSON this run replaced.
"""
from __future__ import annotations

import argparse
import json
import math
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
SELECT_SEED = 0  # the trainer seed every candidate is trained with
QUICK_CANDIDATES = 2  # --quick: the operating point and the first neighbour only


@dataclass(frozen=True)
class Case:
    id: str  # result id (TARGETS.md)
    what: str
    run: Callable[["Case", argparse.Namespace], dict]  # -> {"value", "met", "details"}
    target: str  # as written in TARGETS.md
    threshold: float
    system: dict = field(default_factory=dict)  # simulator config (kind + knobs)
    data: dict = field(default_factory=dict)  # farm.data.DataConfig fields
    train: dict = field(default_factory=dict)  # trainer config fields (method included): the operating point
    seeds: tuple[int, ...] = (0, 1, 2)  # trainer seeds; the value is the median over them
    unit: str = "fraction"
    # The settings the case chooses among, on validation only (module docstring). Each candidate is a
    # dict of overrides of `train` (trainer config fields, e.g. {"lr": 0.01}); an optional key
    # "system" holds overrides of `system`. The operating point itself ({}: `train` and `system` as
    # written) is always the first candidate and need not be listed. Empty: no selection (L7).
    candidates: tuple[dict, ...] = ()


# ---- shared helpers ----------------------------------------------------------------------------------
def lr_neighbours(train: dict, *extra: dict) -> tuple[dict, ...]:
    """Candidates around an operating point: its learning rate x 0.5 and x 2, then `extra`."""
    lr = float(train.get("lr", 0.01))
    return ({"lr": round(lr * 0.5, 10)}, {"lr": round(lr * 2.0, 10)}, *extra)


def candidates_of(case: Case, args: argparse.Namespace) -> list[dict]:
    """The operating point ({}) first, then the case's candidates (--quick: the first two only)."""
    out = [{}] + [dict(c) for c in case.candidates if c]
    return out[:QUICK_CANDIDATES] if args.quick else out


def settings(case: Case, overrides: dict) -> tuple[dict, dict]:
    """(train, system) of a candidate: the case's, with the candidate's overrides applied."""
    ov = dict(overrides)
    system = {**case.system, **ov.pop("system", {})}
    return {**case.train, **ov}, system


def choose(candidates: list[dict], train_candidate: Callable[[dict], dict],
           key: str = "val_accuracy") -> tuple[dict, list[dict]]:
    """Train every candidate (`train_candidate(overrides)` -> its public record, trained with seed
    SELECT_SEED and final_test off) and pick the one with the highest `key` (a validation accuracy);
    ties go to the earlier candidate, i.e. to the operating point first. Returns (the chosen
    overrides, the selection table)."""
    table: list[dict] = []
    best = 0
    for i, overrides in enumerate(candidates):
        record = train_candidate(overrides)
        leaked = [k for k in _flat_keys(record) if "test" in k]
        if leaked:  # a candidate must never carry a test number
            raise RuntimeError(f"candidate {overrides} reported test metrics {leaked}; run it with final_test off")
        table.append({"candidate": i, "overrides": overrides or "operating point", **record, "chosen": False})
        if table[i][key] > table[best][key]:
            best = i
    table[best]["chosen"] = True
    return candidates[best], table


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out += _flat_keys(v, f"{prefix}{k}.")
    return out


def run_record(result, final_test: bool) -> dict:
    """What every run reports: validation per epoch, the selected epoch and, only where the test pass
    ran, the test accuracy of that checkpoint."""
    rec = {
        "val_accuracy": result.val_accuracy,  # of the checkpoint the trainer selected
        "selected_epoch": result.best_epoch,
        "train_accuracy": result.train_accuracy,
        "epochs": result.epochs,
        "val_accuracy_by_epoch": [round(h["val_accuracy"], 4) for h in result.history],
    }
    if final_test:
        if not (result.test_accuracy == result.test_accuracy):  # NaN: the test pass did not run
            raise RuntimeError("the final run has no test accuracy")
        rec = {"test_accuracy": result.test_accuracy, **rec}
    return rec


def selection_details(case: Case, chosen: dict, table: list[dict], args: argparse.Namespace) -> dict:
    train, system = settings(case, chosen)
    return {"selection": {"rule": f"highest selected validation accuracy, trainer seed {SELECT_SEED}, "
                                  f"final_test off (no candidate reads the test split); ties: the "
                                  f"operating point, then the earlier candidate",
                          "candidates": table, "chosen_overrides": chosen or "operating point",
                          "epochs": "as in the candidate's settings" + (" (--quick: <= 2)" if args.quick else "")},
            "operating_point": {"train": case.train, "system": case.system},
            "train": train, "system": system, "data": case.data}


def load_data(case: Case, args: argparse.Namespace):
    from farm.data import DataConfig, load_dataset

    cfg = dict(case.data)
    if cfg.get("kind") == "vowels" and not cfg.get("path"):
        cfg["path"] = str(args.vowels)
    return load_dataset(DataConfig(**cfg))


def build_device(system: dict):
    from actors.systems.registry import build_system

    return build_system(dict(system))


def trainer_config(train: dict, seed: int, args: argparse.Namespace, final_test: bool = True):
    from trainers.registry import method

    train = {**train, "seed": seed, "final_test": final_test,
             "torch_threads": max(1, int(getattr(args, "threads", 1)))}
    if args.quick:
        train["epochs"] = min(int(train.get("epochs", 5)), 2)
    m = method(train["method"])
    return m, m.config_class.model_validate(train)


def train_once(case: Case, args: argparse.Namespace, seed: int, overrides: dict | None = None,
               final_test: bool = True, system_extra: dict | None = None) -> dict:
    """One training on a fresh device with the case's settings plus `overrides`; returns its figures
    (accuracies measured on the device)."""
    train, system = settings(case, overrides or {})
    data = load_data(case, args)
    device = build_device({**system, **(system_extra or {})})
    m, cfg = trainer_config(train, seed, args, final_test)
    t0 = time.monotonic()
    result = m.train(cfg, device, data)
    last = result.history[-1]
    return {
        "seed": seed,
        **run_record(result, final_test),
        "wall_s": round(time.monotonic() - t0, 2),
        "device_calls_per_epoch": last.get("device_calls"),
        "device_calls_train_per_epoch": last.get("device_calls_train"),
        "device_rows_per_epoch": last.get("device_rows"),
        "_result": result,
        "_device": device,
        "_data": data,
        "_config": cfg,
    }


def _public(run: dict) -> dict:
    return {k: v for k, v in run.items() if not k.startswith("_")}


def _seeds(case: Case, args: argparse.Namespace) -> tuple[int, ...]:
    return case.seeds[:1] if args.quick else case.seeds


# ---- one function per method / figure ----------------------------------------------------------------
def phyll_accuracy(case: Case, args: argparse.Namespace) -> dict:
    """PhyLL: settings chosen on validation, then test accuracy on the device, median over seeds."""
    chosen, table = choose(candidates_of(case, args),
                           lambda ov: _public(train_once(case, args, SELECT_SEED, ov, final_test=False)))
    runs = [train_once(case, args, seed, chosen) for seed in _seeds(case, args)]
    value = statistics.median(r["test_accuracy"] for r in runs)
    return {"value": value, "met": value >= case.threshold,
            "details": {"runs": [_public(r) for r in runs], "median_over": "trainer seeds",
                        **selection_details(case, chosen, table, args)}}


def _drift_pairs(case: Case, args: argparse.Namespace, level: float, chosen: dict) -> list[dict]:
    """Per trainer seed: the same training (the chosen settings) without drift and with drift at
    `level` x the nominal rate, plus a control: the drift-trained network's selected checkpoint,
    frozen, re-evaluated on the test split after the device drifted as long again (what the drift does
    to a network that stops learning; a measurement of the final run, it chooses nothing)."""
    from trainers.phyll import PhyLLNet, predict

    pairs = []
    for seed in _seeds(case, args):
        still = train_once(case, args, seed, chosen, system_extra={"drift": 0.0})
        drifting = train_once(case, args, seed, chosen, system_extra={"drift": level})
        device, data, result, cfg = drifting["_device"], drifting["_data"], drifting["_result"], drifting["_config"]
        net = PhyLLNet(device.spec, cfg, data.n_features, data.n_classes, torch.Generator().manual_seed(seed),
                       data.image_shape)
        net.load_state_dict(result.state["selection"]["weights"])  # the checkpoint that was tested
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
    """L8: settings chosen by the no-drift validation accuracy; then the median over trainer seeds of
    (test accuracy without drift - test accuracy with the device drifting at its nominal rate), both
    on the device; PhyLL re-measures every epoch and needs no twin. Details add the same at
    STRESS_DRIFT x the nominal rate (not the figure; shows where tracking stops)."""
    chosen, table = choose(candidates_of(case, args),
                           lambda ov: _public(train_once(case, args, SELECT_SEED, ov, final_test=False,
                                                         system_extra={"drift": 0.0})))
    pairs = _drift_pairs(case, args, NOMINAL_DRIFT, chosen)
    value = statistics.median(p["drop"] for p in pairs)
    stress = {}
    for level in ([] if args.quick else STRESS_DRIFT):
        sp = _drift_pairs(case, args, level, chosen)
        stress[str(level)] = {
            "median_drop": statistics.median(p["drop"] for p in sp),
            "median_frozen_test_accuracy": statistics.median(p["frozen_after_drift_test_accuracy"] for p in sp),
            "pairs": sp,
        }
    sel = selection_details(case, chosen, table, args)
    sel["selection"]["rule"] += "; candidates trained on the device without drift"
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
                        "twin": "none (PhyLL)", "stress": stress, **sel}}


# ---- the table ----------------------------------------------------------------------------------------
CAVITY = {"kind": "cavity", "seed": 0, "n_inputs": 64, "n_outputs": 256}  # default mismatch and noise

PHYLL_TRAIN = {"method": "phyll", "n_blocks": 2, "batch_size": 32, "lr": 0.01, "inner_steps": 1,
               "alpha": 4.0, "skip": False}
# PhyLL's candidates: lr x 0.5 / x 2 and the goodness loss's sharpness alpha x 0.5 / x 2
PHYLL_CANDIDATES = lr_neighbours(PHYLL_TRAIN, {"alpha": 2.0}, {"alpha": 8.0})

CASES: list[Case] = [
    Case("L5-vowels", "PhyLL, cavity, vowels", phyll_accuracy, ">= 0.90", 0.90,
         system=CAVITY, data={"kind": "vowels"}, train={**PHYLL_TRAIN, "epochs": 10},
         candidates=PHYLL_CANDIDATES),
    Case("L5-digits", "PhyLL, cavity, digits", phyll_accuracy, ">= 0.90", 0.90,
         system=CAVITY, data={"kind": "digits"}, train={**PHYLL_TRAIN, "epochs": 6},
         candidates=PHYLL_CANDIDATES),
    Case("L8", "PhyLL accuracy drop under drift vs no drift, cavity, digits", phyll_drift, "<= 0.02", 0.02,
         system=CAVITY, data={"kind": "digits"}, train={**PHYLL_TRAIN, "epochs": 6},
         candidates=PHYLL_CANDIDATES),
]

from bench.pat_cases import pat_cases  # noqa: E402  (the PAT / in-silico rows: L1-L4, L6, L7)

CASES += pat_cases(Case)


def command(args: argparse.Namespace, case_id: str) -> str:
    cmd = f"python -m bench.learning --only {case_id}"
    if args.threads != 1:
        cmd += f" --threads {args.threads}"
    if args.vowels != DEFAULT_VOWELS:
        cmd += f" --vowels {args.vowels}"
    return cmd


def previous(case_id: str) -> dict | None:
    """The value and met of the JSON this run is about to replace (None where there is none)."""
    from bench.common import RESULTS

    path = RESULTS / f"{case_id}.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {"value": old.get("value"), "met": old.get("met"), "command": old.get("command")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these case ids")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: <= 2 epochs, one seed, two candidates, no JSON")
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
        before = previous(case.id)  # read before this run overwrites it
        t0 = time.monotonic()
        out = case.run(case, args)
        wall = time.monotonic() - t0
        out["details"]["wall_s"] = round(wall, 1)
        out["details"]["previous"] = before
        status = "met" if out["met"] else "MISSED"
        was = "" if before is None or before.get("value") is None else f" (was {before['value']:.4f})"
        chosen = out["details"].get("selection", {}).get("chosen_overrides")
        print(f"{case.id}: {out['value']:.4f}{was} (target {case.target}, {status}) [{wall:.0f} s] {case.what}"
              + (f"; chosen: {chosen}" if chosen is not None else ""), flush=True)
        if not args.quick:
            from bench.common import write_result

            if not math.isfinite(out["value"]):
                raise RuntimeError(f"{case.id}: the figure is not finite ({out['value']})")
            path = write_result(case.id, out["value"], case.unit, case.target, out["met"],
                                command(args, case.id), out["details"])
            print(f"  wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
