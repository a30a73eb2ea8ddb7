"""Which MLflow store a command writes to, and whether it answers: settled before anything starts
(no MLflow import here, so that a sweep checks it before its heavy imports)."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from .errors import ConfigError


def resolve_tracking_uri(cli_uri: str | None = None, config_uri: str | None = None,
                         workdir: str | Path | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the config's, else ./mlflow.db as SQLite.

    SQLite paths are made absolute (MLflow 3 needs that); MLflow's file store is refused.
    """
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or config_uri
    base = Path(workdir or os.getcwd()).resolve()
    if not uri:
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith(("http://", "https://", "postgresql", "mysql", "mssql", "databricks")):
        return uri
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return f"sqlite:///{(base / path).resolve()}" if not path.startswith("/") else uri
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"tracking.uri: '{uri}' is a file store, which MLflow 3 refuses; use "
            f"'sqlite:///{base / 'mlflow.db'}' or an http:// tracking server"
        )
    raise ConfigError(f"tracking.uri: unsupported scheme in '{uri}'; use sqlite:////abs/path.db or http://host:port")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before any trial starts if an http tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(
            f"MLflow tracking server {uri} is unreachable ({err}); start it or pass another --tracking-uri"
        ) from None
