"""A new SQLite tracking store seeded from the migrated template is the store MLflow would have built
(oracle: the same schema, revision and Default experiment as a store MLflow builds itself), and seeding
never touches a store that exists or a URI that is not a plain SQLite file."""
from __future__ import annotations

import sqlite3

import pytest
from mlflow.tracking import MlflowClient

from farm.mlflow_ops import MlflowWriter
from farm.store_seed import seed_sqlite_store, sqlite_file, template_path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PHYSFARM_CACHE_DIR", str(tmp_path / "cache"))


def _schema(db) -> tuple:
    with sqlite3.connect(db) as con:
        tables = sorted(con.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
        revision = con.execute("SELECT version_num FROM alembic_version").fetchall()
    return tables, revision


def test_a_seeded_store_is_the_store_mlflow_builds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own, seeded = tmp_path / "own" / "mlflow.db", tmp_path / "seeded" / "mlflow.db"
    own.parent.mkdir()
    seeded.parent.mkdir()
    MlflowClient(f"sqlite:///{own}").search_experiments()  # MLflow builds this one itself
    assert seed_sqlite_store(f"sqlite:///{seeded}") is True
    assert template_path().exists()
    client = MlflowClient(f"sqlite:///{seeded}")
    exps = client.search_experiments()
    assert [(e.experiment_id, e.name) for e in exps] == [("0", "Default")]
    assert _schema(seeded) == _schema(own)
    # MLflow added the Default experiment itself, with the artifact root it gives any new store here
    own_default = MlflowClient(f"sqlite:///{own}").get_experiment("0")
    assert exps[0].artifact_location == own_default.artifact_location
    # and it is a working store: an experiment, a run, a metric, a registered model
    exp = client.create_experiment("e")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "m", 1.5)
    client.create_registered_model("net")
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.5}


def test_the_template_is_built_once_and_rebuilt_when_broken(tmp_path):
    assert seed_sqlite_store(f"sqlite:///{tmp_path / 'a.db'}")
    built = template_path().stat().st_mtime_ns
    assert seed_sqlite_store(f"sqlite:///{tmp_path / 'b.db'}")
    assert template_path().stat().st_mtime_ns == built
    template_path().write_bytes(b"not a database")  # a cache damaged by hand or by a full disk
    assert seed_sqlite_store(f"sqlite:///{tmp_path / 'c.db'}")
    assert [e.name for e in MlflowClient(f"sqlite:///{tmp_path / 'c.db'}").search_experiments()] == ["Default"]


def test_an_existing_store_is_never_replaced(tmp_path):
    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    client.create_experiment("kept")
    before = db.read_bytes()
    assert seed_sqlite_store(f"sqlite:///{db}") is False
    assert db.read_bytes() == before
    assert "kept" in [e.name for e in client.search_experiments()]


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "sqlite://", "sqlite:///:memory:",
                                 "sqlite:///{tmp}/x.db?mode=ro", "sqlite:///{tmp}/missing/x.db",
                                 "postgresql://u@h/db"])
def test_other_uris_are_left_to_mlflow(tmp_path, uri):
    uri = uri.format(tmp=tmp_path)
    assert seed_sqlite_store(uri) is False
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "missing").exists()
    assert not template_path().exists()  # nothing built for a URI it does not seed


def test_relative_sqlite_uris_are_read_from_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_file("sqlite:///mlflow.db") == tmp_path / "mlflow.db"
    assert sqlite_file(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db"


def test_a_sweeps_writer_seeds_its_new_store(tmp_path):
    db = tmp_path / "mlflow.db"
    writer = MlflowWriter(f"sqlite:///{db}", tmp_path / "sweep").open()
    assert template_path().exists() and db.exists()
    assert [e.name for e in writer.client.search_experiments()] == ["Default"]
