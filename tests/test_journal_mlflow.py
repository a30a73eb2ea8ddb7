"""The journal's contract with the real MLflow ops (farm/mlflow_ops.py) on a real SQLite store: writes
done at once while the store answers; during an outage kept in order with copies of their files, the
user told once; replayed in order, idempotently, placeholders resolved (`mlflow_journal_refs.json`).
The outage is MLflow's own error for a locked database, raised by a client put in front of the store
(a real lock would hold each write for SQLite's 20 s busy timeout). Then: a Tune callback is handed
its writer, also after Tune restores it from its folder. Real MLflow, Tune and Ray (for the last)."""
from __future__ import annotations

import io
import json
import pickle
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from farm.journal import PLACEHOLDER
from farm.mlflow_ops import JOURNAL, WRITE_ID_TAG, MlflowWriter, is_outage, replay_file
from farm.tracking import PARENT_TAG, MLflowCallback, SweepTracker


class FlakyClient:
    """A real MlflowClient that, while `down`, fails every call as MLflow does for a locked SQLite
    database (TEMPORARILY_UNAVAILABLE)."""

    def __init__(self, uri: str):
        self.real = MlflowClient(uri)
        self.down = False

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if callable(attr) and self.down:
            def fail(*args, **kwargs):
                raise MlflowException("(sqlite3.OperationalError) database is locked",
                                      error_code=TEMPORARILY_UNAVAILABLE)
            return fail
        return attr


def test_outage_errors_are_told_from_refusals(tmp_path):
    import sqlalchemy

    db = tmp_path / "locked.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("create table t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = sqlalchemy.create_engine(f"sqlite:///{db}", connect_args={"timeout": 0.1})
    with pytest.raises(sqlalchemy.exc.OperationalError) as locked:
        with engine.connect() as con:
            con.execute(sqlalchemy.text("insert into t values (1)"))
    holder.execute("ROLLBACK")
    assert is_outage(locked.value)  # a locked database: try again later
    assert is_outage(ConnectionRefusedError()) and is_outage(TimeoutError())
    assert is_outage(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_outage(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))  # refused for good
    assert not is_outage(ValueError("bad value"))


def test_mlflow_writes_survive_an_outage_and_replay_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = FlakyClient(uri)
    folder = tmp_path / "sweep"
    told = io.StringIO()
    w = MlflowWriter(uri, folder, stream=told, client=client).open()
    exp = w.experiment("j")  # its artifacts beside the database
    parent = w.call("create_run", experiment_id=exp, run_name="p", tags={"physfarm.kind": "sweep"})
    w.call("log_batch", run=parent, metrics=[["m", 1.0, 1000, 1]])
    assert not parent.startswith(PLACEHOLDER) and w.pending == 0 and not folder.exists()

    client.down = True
    child = w.call("create_run", experiment_id=exp, run_name="c", tags={PARENT_TAG: parent})
    assert child.startswith(PLACEHOLDER) and w.open_runs() == sorted([parent, child])
    note = tmp_path / "note.txt"
    note.write_text("kept")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    np.savez(ckpt / "params.npz", theta=np.zeros(3))
    np.savez(ckpt / "predictions.npz", y_true=np.array([0, 1, 1]), y_pred=np.array([0, 1, 0]))
    for step in (1, 2):
        w.call("log_batch", run=child, metrics=[["val_accuracy", 0.5 * step, 1000 + step, step]],
               params=[["p", "x"]] if step == 1 else None, tags=[["t", "y"]])
    w.call("log_artifact", run=child, local_path=str(note), artifact_path="notes")
    w.call("outcome", run=child, folder=str(ckpt), title="c")
    w.call("set_terminated", run=child, status="FINISHED")
    w.call("set_tag", run=parent, key="physfarm.best_run", value=child)
    note.unlink()
    shutil.rmtree(ckpt)  # the caller's files are gone (Tune deleted the checkpoint): the journal kept copies
    assert w.pending == 7 and (folder / JOURNAL).exists() and child not in w.open_runs()
    assert told.getvalue().count("unreachable (") == 1 and str(folder / JOURNAL) in told.getvalue()
    assert f"MLflow tracking store {uri}" in told.getvalue()
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)

    client.down = False
    assert w.flush() and w.pending == 0
    assert "answers again; replayed 7 kept MLflow writes" in told.getvalue()
    assert not (folder / JOURNAL).exists()
    real = w.resolve(child)
    assert not real.startswith(PLACEHOLDER)
    assert json.loads((folder / "mlflow_journal_refs.json").read_text()) == {child: real}

    # The whole journal replayed again by another process (a crash before the trim and before the map
    # was saved): the run is found by its write id, nothing is duplicated.
    (copy / "mlflow_journal_refs.json").unlink(missing_ok=True)
    assert replay_file(copy / JOURNAL, uri, stream=io.StringIO()) == (7, 0)

    store = MlflowClient(uri)
    assert sorted(r.info.run_name for r in store.search_runs([exp])) == ["c", "p"]
    run = store.get_run(real)
    assert run.info.status == "FINISHED" and run.data.params == {"p": "x"} and run.data.tags["t"] == "y"
    assert run.data.tags[PARENT_TAG] == parent and run.data.tags[WRITE_ID_TAG] == child
    assert [(m.step, m.value) for m in store.get_metric_history(real, "val_accuracy")] == [(1, 0.5), (2, 1.0)]
    assert store.get_run(parent).data.tags["physfarm.best_run"] == real
    arts = {a.path for d in ("", "notes", "model", "eval", "plots") for a in store.list_artifacts(real, d or None)}
    assert {"notes/note.txt", "model/params.npz", "eval/predictions.npz", "plots/learning_curve.png",
            "plots/confusion_matrix.png"} <= arts
    assert Path(store.download_artifacts(real, "notes/note.txt", str(tmp_path / "dl"))).read_text() == "kept"


def test_a_write_the_store_refuses_is_raised_and_an_unopened_writer_refuses(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    w = MlflowWriter(uri, tmp_path / "sweep")
    tracker = SweepTracker(w, "exp", "sweep", {"user": "ada"})  # nor does a tracker on it
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "sweep").exists()  # no I/O yet
    assert tracker.parent_run_id is None and tracker.experiment_id is None
    with pytest.raises(RuntimeError, match="call open"):
        w.call("set_tag", run="r", key="k", value="v")
    w.open()
    with pytest.raises(ValueError, match="'nope': unknown"):
        w.call("nope")
    with pytest.raises(MlflowException):
        w.call("set_tag", run="no-such-run", key="k", value="v")
    assert w.pending == 0


def test_a_kept_write_the_store_refuses_is_set_aside_and_blocks_nothing(tmp_path):
    """A run whose creation the store refuses on replay: that write and the writes naming its
    placeholder are set aside in mlflow_journal_rejected.jsonl; the writes behind them are replayed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = FlakyClient(uri)
    told = io.StringIO()
    w = MlflowWriter(uri, tmp_path / "sweep", stream=told, client=client).open()
    exp = w.experiment("j")
    client.down = True
    lost = w.call("create_run", experiment_id="999999", run_name="lost")  # no such experiment
    w.call("log_batch", run=lost, metrics=[["m", 1.0, 1000, 1]])
    kept = w.call("create_run", experiment_id=exp, run_name="kept")
    w.call("log_batch", run=kept, metrics=[["m", 2.0, 1000, 1]])
    client.down = False
    assert w.flush() and w.pending == 0
    rejected = [json.loads(ln)
                for ln in (tmp_path / "sweep" / "mlflow_journal_rejected.jsonl").read_text().splitlines()]
    assert [r["op"] for r in rejected] == ["create_run", "log_batch"]
    assert "was never created" in rejected[1]["error"]
    assert told.getvalue().count("refused a kept write") == 2
    store = MlflowClient(uri)
    assert [m.value for m in store.get_metric_history(w.resolve(kept), "m")] == [2.0]


def test_the_tune_callback_writes_through_the_writer_it_is_handed(ray_session, tmp_path):
    from ray import tune

    def one_epoch(config):  # defined here: pickled by value (Ray's workers cannot import this module)
        tune.report({"epoch": 1, "val_accuracy": 0.5})

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "ray_results" / "cb"
    w = MlflowWriter(uri, folder).open()
    exp = w.experiment("cb")
    parent = w.call("create_run", experiment_id=exp, run_name="cb")
    callback = MLflowCallback(w, exp, parent, "cb", devices=["osc"])
    copy = pickle.loads(pickle.dumps(callback))  # Tune pickles it with its experiment state
    assert copy._writer is None and copy.journal_dir == str(folder) and copy.parent_run_id == parent

    tuner = tune.Tuner(one_epoch, param_space={"train": {"method": "pat", "device": "osc"}},
                       run_config=tune.RunConfig(name="cb", storage_path=str(folder.parent), callbacks=[callback]))
    tuner.fit()
    assert len(w.trial_runs) == 1  # the callback Tune ran is the one handed the writer
    run = MlflowClient(uri).get_run(next(iter(w.trial_runs.values())))
    assert run.info.status == "FINISHED" and run.data.tags[PARENT_TAG] == parent

    # a resume: the sweep opens its writer on the folder, then Tune unpickles the callback
    again = MlflowWriter(uri, folder).open()
    restored = pickle.loads(pickle.dumps(callback))
    assert restored.writer is again and restored.parent_run_id == parent
    elsewhere = pickle.loads(pickle.dumps(MLflowCallback(w, exp, parent, "cb")))
    elsewhere.journal_dir = str(tmp_path / "other")  # no writer open there: it opens its own
    assert elsewhere.writer is not again and elsewhere.writer.folder == tmp_path / "other"
