"""A new SQLite tracking store laid down as a copy of an empty, already migrated one.

MLflow builds a new SQLite store by creating its first tables and then running every schema migration
since (about 3 s of CPU on a 2-core machine, 5 s of an `mlflow server`'s start), on the critical path of
every sweep or training that writes to a new file. For one MLflow version the migrated, empty tables are
the same every time, so the first store a machine builds (tables only: no experiment, no run) is kept in
the cache folder, and a later new store starts as a copy of it. MLflow then opens it as it opens any
store and adds the Default experiment with this store's own artifact root, exactly as for a store it
built itself (tests/test_store_seed.py compares the two). Anything unexpected (a store that exists,
another process creating it at the same moment, a URI that is not a plain SQLite file, an unusable
cache) leaves the store to MLflow: seeding can only save time, never change what is stored."""
from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

CACHE_ENV = "PHYSFARM_CACHE_DIR"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a plain `sqlite:///` URI (absolute, or relative to the working folder);
    None for any other store, an in-memory one or a URI with query options."""
    if not uri.startswith("sqlite:///") or "?" in uri:
        return None
    rest = uri[len("sqlite:///"):]
    if not rest or rest == ":memory:":
        return None
    return Path(rest).absolute()


def template_path() -> Path:
    """Where this MLflow version's empty migrated store is kept (one per version: a template made by
    another version would have another schema)."""
    from importlib.metadata import version

    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "physfarm"
    return Path(base).expanduser() / "mlflow-store" / f"empty-{version('mlflow')}.db"


def _usable(db: Path) -> bool:
    """A complete SQLite file with MLflow's tables and one schema revision, and no experiment yet."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            ok = con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
            revisions = con.execute("SELECT count(*) FROM alembic_version").fetchone()[0]
            experiments = con.execute("SELECT count(*) FROM experiments").fetchone()[0]
        return ok and revisions == 1 and experiments == 0
    except sqlite3.Error:
        return False


def _build_template(target: Path) -> None:
    """MLflow's own table creation and migrations into a fresh file, moved into place whole."""
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine_with_retry

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    engine = create_sqlalchemy_engine_with_retry(f"sqlite:///{tmp}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    os.replace(tmp, target)  # readers see the old template or the new one, never half of one


def template() -> Path:
    """This version's template, built (once per machine and MLflow version) when absent or unusable."""
    path = template_path()
    if not _usable(path):
        _build_template(path)
        if not _usable(path):
            raise RuntimeError(f"the store template {path} is not usable after building it")
    return path


def seed_sqlite_store(uri: str) -> bool:
    """Lay down the new SQLite store at `uri` as a copy of the template; True when it did. False, with
    nothing written, when `uri` is no plain SQLite file, the file exists (or appears meanwhile: that
    store wins), its folder is missing (MLflow's own error says so) or the template cannot be had."""
    path = sqlite_file(uri)
    if path is None or path.exists() or not path.parent.is_dir():
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.seed")
    try:
        shutil.copyfile(template(), tmp)
        os.link(tmp, path)  # atomic, and never replaces a store another process created meanwhile
        return True
    except Exception:  # noqa: BLE001 - any failure leaves the store to MLflow, which builds it itself
        return False
    finally:
        tmp.unlink(missing_ok=True)
