"""`physfarm` command line. Config errors print one line and exit with code 2 before anything starts."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .errors import ConfigError

EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


def _mlflow_ui_command(uri: str) -> str:
    local = Path(sys.executable).parent / "mlflow"
    exe = str(local) if local.exists() else (shutil.which("mlflow") or "mlflow")
    return f"{exe} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def format_leaderboard(outcome, metric: str, mode: str) -> str:
    """Ranked by `metric` at each trial's selected checkpoint; its test accuracy (one final pass on
    that checkpoint) beside it, never used to rank."""
    from .sweep import selected_value
    from .tables import fmt_number, format_table

    rows = outcome.leaderboard(metric, mode)
    keys = [k for k in dict.fromkeys(k for r in rows for k in r.config)]
    header = ["rank", "trial", *keys, metric, "test_accuracy", "epochs", "device_s", "status"]
    table = [header]
    for i, r in enumerate(rows, 1):
        table.append([
            str(i), r.trial_id, *(f"{r.config.get(k)}" for k in keys),
            fmt_number(selected_value(r.metrics, metric)), fmt_number(r.metrics.get("test_accuracy")),
            str(r.metrics.get("epoch", "-")),
            fmt_number(r.metrics.get("device_s_total"), 2),
            r.status if not r.error else f"{r.status}: {r.error}",
        ])
    return format_table(table)


def _forward_sigterm() -> None:
    """SIGTERM stops a sweep like Ctrl-C does: Tune saves the experiment state, --resume continues."""
    import os
    import signal

    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))


def _report_check(cfg, uri: str) -> int:
    """`sweep --check`: the config is valid; say what the sweep would run. Starts and writes nothing
    (no Ray, no MLflow store, no results folder, no network)."""
    from .sweep_folder import sweep_name
    from .trainspec import expected_trials

    n = expected_trials(cfg)
    devices = ", ".join(d.name for d in cfg.devices)
    sampled = ", ".join(cfg.sampled_paths()) or "none"
    print(f"ok: {n} trial{'s' if n != 1 else ''} in sweep '{sweep_name(cfg)}' on device"
          f"{'s' if len(cfg.devices) != 1 else ''} {devices}; sampled: {sampled}; tracking: {uri}")
    from .fidelity import fidelity_plan

    plan = fidelity_plan(cfg)
    if plan is not None:
        print(f"multifidelity: {plan.screen or n} screened in silico (fidelity 0), the {plan.promote} best by "
              f"device validation promoted to PAT, ASHA keeping about {plan.keep} to the end")
    if cfg.sweep.device_budget_s:
        print(f"device budget: {cfg.sweep.device_budget_s:g} device seconds for the whole sweep")
    for dev in cfg.devices:
        for note in dev._notes:
            print(f"note: device '{dev.name}': {note}")
    return 0


def quiet_libraries() -> None:
    """physfarm's own view replaces Tune's console; the libraries' informational logs, progress bars
    and known-noise warnings stay out of it (`--verbose` brings them back)."""
    import logging
    import os

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's experiment banner and result boxes
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    for name in ("ray", "ray.tune", "ray.train", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_sweep(args) -> int:
    from .config import load_config
    from .phases import mark

    mark("cli")
    cfg = load_config(args.config)  # validates everything before Ray or MLflow start
    mark("config_loaded")
    from .raycluster import check_trial_cpus, init_ray
    from .sweep_folder import check_resumable, sweep_name
    from .tracking_uri import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, cfg.tracking.uri)  # a refused URI is a config error too
    check_trial_cpus(cfg, args.address)
    if args.lan and args.address:
        raise ConfigError(f"--lan starts a local Ray on this machine's network address; --address "
                          f"{args.address} joins a running one instead: give one of the two")
    if getattr(args, "check", False):
        return _report_check(cfg, uri)
    check_reachable(uri)  # an unreachable tracking server: one line, before anything starts
    marker = check_resumable(cfg, uri, sweep_name(cfg), args.resume or args.resume_errored)
    if not args.verbose:
        quiet_libraries()
    # Ray Tune and MLflow take seconds to import, the store seconds to open, and starting Ray is mostly
    # waiting for its processes: all at once. Ray starts on the main thread (its processes are bound to
    # the thread that starts them); the imports, the store and the data go on a thread of their own.
    import ray  # noqa: F401 - first, here: the thread's imports and ray.init share none of Ray's own modules
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from .sweep_folder import storage_path

    folder = Path(storage_path(cfg)) / sweep_name(cfg)
    with ThreadPoolExecutor(1, thread_name_prefix="physfarm-start") as pool:
        opened = pool.submit(_open_store_and_data, cfg, uri, folder, marker, not args.verbose)
        address = init_ray(args.address, lan=args.lan)
        mark("ray_ready")
        _forward_sigterm()  # after ray.init, which installs its own SIGTERM handler
        print(ray_banner(address, joined=bool(args.address), lan=args.lan), flush=True)
        from .sweep import run_sweep  # imported by the thread by now, or waits for it to be

        mark("imports")
        outcome = run_sweep(cfg, address=args.address, tracking_uri=args.tracking_uri,
                            verbose=1 if args.verbose else 0, resume=args.resume or args.resume_errored,
                            resume_errored=args.resume_errored, show=not args.quiet, opened=opened)
    devices = sorted({str(r.config.get("device")) for r in outcome.rows if r.config.get("device")})
    where = f"on device '{cfg.train.get('device', '?')}'" if not devices else \
        "on each trial's device" if len(devices) > 1 else f"on device '{devices[0]}'"
    print()
    state = " (resumed)" if outcome.resumed else ""
    print(f"Leaderboard{state}: {len(outcome.rows)} trials by {cfg.sweep.metric} (validation split), "
          f"test_accuracy beside it (the selected checkpoint's one test pass), measured {where}")
    print(format_leaderboard(outcome, cfg.sweep.metric, cfg.sweep.mode))
    print()
    print(f"MLflow: experiment '{outcome.experiment}', sweep run {outcome.parent_run_id}, store {outcome.tracking_uri}")
    if outcome.tracking_uri.startswith("sqlite:"):
        print(f"Open the MLflow UI:  physfarm ui --tracking-uri {outcome.tracking_uri}   "
              f"(or: {_mlflow_ui_command(outcome.tracking_uri)})")
        if outcome.experiment_id:
            from .report import ui_link

            print(f"  then browse to {ui_link('http://127.0.0.1:5000', outcome.experiment_id)}   "
                  f"(the sweep's trials, in MLflow's model-training view)")
    else:
        print(f"Open the MLflow UI:  {outcome.tracking_uri}")
    if outcome.interrupted:
        print(f"physfarm: sweep '{outcome.name}' interrupted; continue it with: "
              f"physfarm sweep {args.config} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    failed = [r for r in outcome.rows if r.status != "TERMINATED"]
    mark("printed")
    return 1 if failed and len(failed) == len(outcome.rows) else 0


def _open_store_and_data(cfg, uri: str, folder, marker, quiet: bool):
    """farm.sweep.open_store_and_data, importing farm.sweep (Ray Tune, MLflow) first: run on a thread."""
    from .sweep import open_store_and_data

    if quiet:
        quiet_libraries()  # again: MLflow sets its own loggers' levels when it is first imported
    return open_store_and_data(cfg, uri, folder, marker)


def ray_banner(address: str, joined: bool, lan: bool = False) -> str:
    """The line that says which Ray a command uses and how another shell attaches to it."""
    from .raycluster import attach_command

    whose = "joined" if joined else ("started for this run, on the network (--lan)" if lan
                                      else "started for this run, on 127.0.0.1 only")
    return f"Ray: {address} ({whose}); its devices from another shell: {attach_command(address)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="physfarm", description="Train physical neural networks on a "
                                     "farm of devices and simulators (Ray Tune + MLflow).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sweep", help="run a Ray Tune sweep from a YAML config")
    p.add_argument("config", help="sweep config YAML (see examples/quickstart.yaml)")
    p.add_argument("--address", default=None, help="existing Ray cluster address (default: start a local Ray)")
    p.add_argument("--lan", action="store_true",
                   help="without --address: start the local Ray on this machine's network address, so that "
                        "lab PCs can join it (`ray start --address`); by default it listens on 127.0.0.1 only")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the config's, or ./mlflow.db)")
    p.add_argument("--quiet", action="store_true", help="no live view of the trials and devices (the leaderboard "
                   "is still printed at the end)")
    p.add_argument("--verbose", action="store_true", help="also Tune's own status tables, and the libraries' "
                   "informational logs (Ray, Tune, MLflow)")
    p.add_argument("--check", action="store_true",
                   help="only validate the config and print how many trials it would run (exit 0, or "
                        "2 with the error); starts nothing and writes nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep of this config (same sweep.name and storage_path): "
                        "finished trials are kept, unfinished ones resume from their last checkpoint")
    p.add_argument("--resume-errored", action="store_true",
                   help="like --resume, and also retry failed trials from their last checkpoint")
    p.set_defaults(func=cmd_sweep)

    from .report import add_report_parser, add_ui_parser
    from .train_cli import add_train_parser

    add_train_parser(sub)
    add_report_parser(sub)
    add_ui_parser(sub)

    from .devices_cli import add_devices_parser
    from .eval_cli import add_eval_parser

    add_devices_parser(sub)
    add_eval_parser(sub)

    try:
        from .instrument_cli import add_instrument_parser
    except ImportError:
        add_instrument_parser = None
    if add_instrument_parser is not None:
        add_instrument_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"physfarm: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except ConnectionError as err:  # an unreachable tracking server or cluster: one line
        print(f"physfarm: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("physfarm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as err:  # a data file found bad when a command reads it (after --check passed)
        from actors.tables import TableError

        from .datasources import DataError

        if not isinstance(err, (DataError, TableError)):
            raise
        print(f"physfarm: data error: {err}", file=sys.stderr)
        return EXIT_CONFIG


def entry() -> None:
    """The `physfarm` command: `main`, then a quick exit. Once the command is done (threads joined,
    Ray shut down and every atexit handler run, MLflow's among them, the output flushed), the
    interpreter's own teardown is skipped: with torch, Ray and MLflow loaded it takes 2-5 s on a small
    machine and does nothing a finished command needs."""
    code = main()
    import atexit
    import os
    import threading

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    stop_threads = getattr(threading, "_shutdown", None)
    if run_exit_handlers is None or stop_threads is None:  # not CPython: the ordinary exit
        sys.exit(code)
    # What the interpreter does first on exit: tell thread pools to finish (concurrent.futures' exit
    # hook: an idle pool worker would otherwise wait for work forever), then wait for every
    # non-daemon thread.
    stop_threads()
    run_exit_handlers()  # Ray's shutdown, MLflow's flushes, temporary folders' removal
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
