"""`physfarm report`: a sweep's leaderboard read back from MLflow; `physfarm ui`: the MLflow UI on the
configured store, bound to 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .errors import ConfigError

EXIT_NOTHING = 1


def ui_link(base: str, experiment_id: str | None = None) -> str:
    """The UI's address of the experiments (or of one) in its model-training view (runs, charts,
    models): MLflow 3's UI opens a browser's first visit in its GenAI view (traces, judges) whatever
    the experiment's kind, and this query switches it."""
    where = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"{base}/#/{where}?workflowType=machine_learning"


def _uri(args) -> str:
    from .tracking import check_reachable, resolve_tracking_uri, sqlite_path

    config_uri = None
    if getattr(args, "config", None):
        from .config import load_config

        config_uri = load_config(args.config).tracking.uri
    if config_uri is None and getattr(args, "journal", None):
        # `physfarm report --journal PATH`, as printed after an outage: the journal names its store
        from .mlflow_ops import journal_uri

        first = Path(args.journal[0])
        config_uri = journal_uri(first) if first.is_file() else None
    uri = resolve_tracking_uri(args.tracking_uri, config_uri)
    check_reachable(uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists() and getattr(args, "must_exist", True):
        raise ConfigError(f"--tracking-uri: no MLflow store at {db} (run a sweep first, or pass --tracking-uri)")
    return uri


def _config_experiment(args) -> str | None:
    if getattr(args, "config", None):
        from .config import load_config

        return load_config(args.config).tracking.experiment
    return None


def find_sweep(client, experiment: str | None, sweep: str | None):
    """The parent run of the named sweep (or the latest sweep) in the experiment (or in any)."""
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise LookupError(f"no MLflow experiment '{experiment}'; experiments: {', '.join(names) or 'none'}")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        raise LookupError("the tracking store has no experiments yet")
    flt = "tags.`physfarm.kind` = 'sweep'"
    if sweep:
        flt += f" and tags.`physfarm.sweep` = '{sweep}'"
    runs = client.search_runs(ids, filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        where = f"experiment '{experiment}'" if experiment else "the tracking store"
        raise LookupError(f"no physfarm sweep{' named ' + repr(sweep) if sweep else ''} in {where}")
    return runs[0]


def leaderboard(client, parent) -> dict:
    from .tracking import PARENT_TAG

    from .sweep import selected_value

    metric = parent.data.params.get("sweep.metric", "val_accuracy")
    mode = parent.data.params.get("sweep.mode", "max")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
                                  max_results=50_000)
    # Columns: the train params that differ between trials.
    keys = sorted({k for r in children for k in r.data.params if k.startswith("train.")})
    varying = [k for k in keys if len({r.data.params.get(k) for r in children}) > 1]

    def rank_key(run):
        value = selected_value(run.data.metrics, metric)
        if run.info.status != "FINISHED" or value is None or value != value:
            return (1, 0.0, run.data.tags.get("physfarm.trial_id") or "")
        # ties go to the lower trial id, as in the sweep's own leaderboard
        return (0, -value if mode == "max" else value, run.data.tags.get("physfarm.trial_id") or "")

    rows = []
    for i, run in enumerate(sorted(children, key=rank_key), 1):
        m = run.data.metrics
        rows.append({
            "rank": i, "trial_id": run.data.tags.get("physfarm.trial_id"), "run_id": run.info.run_id,
            "status": run.info.status,
            "params": {k.removeprefix("train."): run.data.params.get(k) for k in varying},
            "metrics": {k: m[k] for k in sorted(m)},
            "error": (run.data.tags.get("physfarm.error") or "").strip().splitlines()[-1:] or None,
        })
        if rows[-1]["error"]:
            rows[-1]["error"] = rows[-1]["error"][0][:200]
    return {"experiment": client.get_experiment(parent.info.experiment_id).name,
            "sweep": parent.data.tags.get("physfarm.sweep"), "parent_run_id": parent.info.run_id,
            "status": parent.info.status, "metric": metric, "mode": mode,
            "best_trial": parent.data.tags.get("physfarm.best_trial"), "trials": rows}


def format_report(board: dict) -> str:

    metric = board["metric"]
    params = list(dict.fromkeys(k for r in board["trials"] for k in r["params"]))
    from .sweep import selected_value
    from .tables import fmt_number, format_table

    table = [["rank", "trial", *params, metric, "test_accuracy", "epoch", "device_s", "status"]]
    for r in board["trials"]:
        m = r["metrics"]
        table.append([str(r["rank"]), str(r["trial_id"]), *(str(r["params"].get(k)) for k in params),
                      fmt_number(selected_value(m, metric)), fmt_number(m.get("test_accuracy")),
                      str(r["epoch"]) if r.get("epoch") is not None else "-",
                      fmt_number(m.get("device_s_total"), 2),
                      r["status"] + (f": {r['error']}" if r["error"] else "")])
    head = (f"Sweep '{board['sweep']}' ({board['status']}) in experiment '{board['experiment']}', "
            f"run {board['parent_run_id']}: {len(board['trials'])} trials by {metric} ({board['mode']})")
    return head + "\n" + format_table(table)


def journal_files(args) -> list[Path]:
    """Journals of MLflow writes a sweep or `physfarm train` kept while the store was down
    (farm/mlflow_ops.py): those named with --journal, the config's sweep folder's, and any under
    ./ray_results (the default storage_path)."""
    from .mlflow_ops import JOURNAL

    found = [Path(p) for p in (getattr(args, "journal", None) or [])]
    for p in found:
        if not p.is_file():
            raise ConfigError(f"--journal: no journal file at {p} (it is <storage_path>/<sweep name>/{JOURNAL})")
    if getattr(args, "config", None):
        from .config import load_config
        from .sweep import storage_path, sweep_name

        cfg = load_config(args.config)
        found.append(Path(storage_path(cfg)) / sweep_name(cfg) / JOURNAL)
    found += sorted(Path("ray_results").glob(f"*/{JOURNAL}"))
    out: list[Path] = []
    for p in found:
        if p.is_file() and p.resolve() not in out:
            out.append(p.resolve())
    return out


def replay_journals(args, uri: str) -> None:
    """Replay the pending journals for this store before reading it, so the report shows every result."""
    from .mlflow_ops import limit_http_retries, replay_file

    import contextlib

    limit_http_retries()
    for path in journal_files(args):
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints run links on stdout: keep --json clean
            done, left = replay_file(path, uri, stream=sys.stderr)
        if left:
            print(f"physfarm report: {left} MLflow writes in {path} could not be replayed yet (the store did "
                  f"not take them); the report may miss them", file=sys.stderr)


def cmd_report(args) -> int:
    from mlflow.tracking import MlflowClient

    uri = _uri(args)
    replay_journals(args, uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        parent = find_sweep(client, args.experiment or _config_experiment(args), args.sweep)
    except LookupError as err:
        print(f"physfarm report: {err} (store {uri})", file=sys.stderr)
        return EXIT_NOTHING
    board = leaderboard(client, parent)
    # The epoch a trial reached: the last step of its metric history.
    for row in board["trials"]:
        history = client.get_metric_history(row["run_id"], board["metric"])
        row["epoch"] = max((h.step for h in history), default=None)
    if args.json:
        print(json.dumps(board, indent=1, default=str))
    else:
        print(format_report(board))
    return 0


def mlflow_executable() -> str:
    local = Path(sys.executable).parent / "mlflow"
    return str(local) if local.exists() else (shutil.which("mlflow") or "mlflow")


def ui_command(uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    return [mlflow_executable(), "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", str(workers)]


def cmd_ui(args) -> int:
    args.must_exist = False
    uri = _uri(args)
    if uri.startswith(("http://", "https://")):
        print(f"The tracking store is a server; its UI is at {uri}")
        return 0
    cmd = ui_command(uri, args.host, args.port, args.workers)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"physfarm ui: warning: listening on {args.host}: anyone who can reach this machine can read "
              f"and change the runs (MLflow's UI has no login)", file=sys.stderr)
    print(f"MLflow UI on http://{args.host}:{args.port} for {uri} (Ctrl-C stops it); the runs and charts in "
          f"its model-training view: {ui_link(f'http://{args.host}:{args.port}')}", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the UI replaces this process: signals reach it directly
    return 0  # not reached


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="print a sweep's leaderboard from MLflow")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the config's, or any)")
    p.add_argument("--sweep", default=None, help="sweep name (default: the latest sweep)")
    p.add_argument("--config", default=None, help="take the tracking store and experiment from this config")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the config's, or ./mlflow.db)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--journal", action="append", default=None, metavar="PATH",
                   help="replay this journal of MLflow writes a sweep kept while the store was down "
                        "(<storage_path>/<sweep>/mlflow_journal.jsonl; the config's and ./ray_results' "
                        "are replayed anyway); may be repeated")
    p.set_defaults(func=cmd_report)


def add_ui_parser(sub) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the tracking store (127.0.0.1 by default)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    p.add_argument("--config", default=None, help="take the tracking store from this config")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the config's, or ./mlflow.db)")
    p.set_defaults(func=cmd_ui)
