"""The generic journal (farm/journal.py) against a fake store: no MLflow, no Ray. Ops are done at once
while the store answers; from the first outage on they are appended, fsynced, to the journal file and
replayed in order, idempotently, once it answers; placeholders of things created during the outage get
their real ids; the user is told once when it goes down and once when the replay succeeds."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest

from farm.journal import PLACEHOLDER, Journal, read_header


class Down(ConnectionError):
    """The fake store does not answer."""


class Refused(ValueError):
    """The fake store refuses an op for good."""


class FakeStore:
    """A store of named things with ids, as an `apply` callable: `create` makes a thing (idempotent on
    replay by its placeholder, like MLflow's write-id tag), `put` writes a value under a thing (the same
    value written twice is stored once), `read` records the content of a file, `bad` is refused."""

    def __init__(self):
        self.up = True
        self.things: dict[str, dict] = {}
        self.log: list[tuple] = []  # every op applied, with its replay flag
        self.by_ref: dict[str, str] = {}

    def __call__(self, op: dict, replay: bool):
        if not self.up:
            raise Down("connection refused")
        self.log.append((op["op"], replay, {k: v for k, v in op.items() if k != "op"}))
        if op["op"] == "create":
            if replay and op["ref"] in self.by_ref:
                return self.by_ref[op["ref"]]
            new = f"id{len(self.things)}"
            self.things[new] = {"name": op["name"], "parent": op.get("parent"), "values": []}
            self.by_ref[op["ref"]] = new
            return new
        if op["op"] == "put":
            thing = self.things[op["thing"]]  # a KeyError for an unresolved placeholder
            if op["value"] not in thing["values"]:
                thing["values"].append(op["value"])
            return None
        if op["op"] == "read":
            self.things[op["thing"]]["values"].append(Path(op["path"]).read_text())
            return None
        raise Refused(f"op {op['op']!r} refused")


def is_down(err: BaseException) -> bool:
    return isinstance(err, Down)


def journal(folder: Path, store: FakeStore, stream=None, **kw) -> Journal:
    return Journal(folder, store, name="j", header={"store": "fake"}, is_outage=is_down, label="fake store",
                   noun="fake write", stream=stream or io.StringIO(), retry_min_s=kw.pop("retry_min_s", 60.0), **kw)


def test_constructing_does_no_io_and_an_unopened_journal_refuses_ops(tmp_path):
    folder = tmp_path / "not-yet"
    j = journal(folder, FakeStore())
    assert not folder.exists()
    with pytest.raises(RuntimeError, match="not opened; call open"):
        j.submit({"op": "put", "thing": "x", "value": 1})
    with pytest.raises(ValueError, match="'op' key"):
        j.open().submit({"thing": "x"})
    assert not folder.exists()


def test_ops_are_done_at_once_while_the_store_answers(tmp_path):
    store = FakeStore()
    j = journal(tmp_path / "j", store).open()
    thing = j.submit({"op": "create", "name": "a"}, creates=True)
    assert thing == "id0" and j.submit({"op": "put", "thing": thing, "value": 1}) is None
    assert store.things["id0"]["values"] == [1] and [r for _, r, _ in store.log] == [False, False]
    assert j.pending == 0 and not (tmp_path / "j").exists()  # nothing on disk while the store answers


def test_an_outage_keeps_that_op_and_every_later_one_fsynced_in_order(tmp_path, monkeypatch):
    store = FakeStore()
    told = io.StringIO()
    j = journal(tmp_path / "j", store, stream=told).open()
    a = j.submit({"op": "create", "name": "a"}, creates=True)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))

    store.up = False
    for value in (1, 2, 3):
        assert j.submit({"op": "put", "thing": a, "value": value}) is None
    assert j.pending == 3
    assert synced == [str(j.path)] * 3  # each kept op is on disk before submit returns
    lines = j.path.read_text().splitlines()
    assert json.loads(lines[0]) == {"journal": 1, "store": "fake"} == read_header(j.path)
    assert [json.loads(ln)["value"] for ln in lines[1:]] == [1, 2, 3]
    assert [json.loads(ln)["seq"] for ln in lines[1:]] == [0, 1, 2]

    # The store is back, but a new op still goes behind the kept ones (the backoff has not run out).
    store.up = True
    j.submit({"op": "put", "thing": a, "value": 4})
    assert j.pending == 4 and store.things[a]["values"] == []
    # A new process (a fresh journal on the same folder) sees the same ops.
    assert journal(tmp_path / "j", FakeStore()).open().pending == 4

    assert j.flush() and j.pending == 0
    assert store.things[a]["values"] == [1, 2, 3, 4]  # in the order they were submitted
    assert [r for _, r, _ in store.log[1:]] == [True] * 4
    assert not j.path.exists()  # trimmed away once empty
    out = told.getvalue().splitlines()
    assert len(out) == 2, out
    assert out[0].startswith("physfarm: fake store: unreachable (connection refused); training goes on. 1 fake "
                             "write(s) kept so far in ") and str(j.path) in out[0]
    assert out[1] == f"physfarm: fake store: answers again; replayed 4 kept fake writes from {j.path}"


def test_told_once_per_outage_and_backoff_holds_retries(tmp_path):
    store = FakeStore()
    told = io.StringIO()
    j = journal(tmp_path / "j", store, stream=told, retry_min_s=0.05, retry_max_s=0.2).open()
    store.up = False
    for value in range(5):
        j.submit({"op": "put", "thing": "x", "value": value})
    assert told.getvalue().count("unreachable (") == 1
    assert not j.maybe_flush()  # still down
    assert not j.flush(wait_s=0.3, poll_s=0.1)
    assert told.getvalue().count("unreachable (") == 1 and j.pending == 5


def test_placeholders_get_their_real_ids_on_replay_at_any_depth(tmp_path):
    store = FakeStore()
    j = journal(tmp_path / "j", store).open()
    store.up = False
    parent = j.submit({"op": "create", "name": "p"}, creates=True)
    child = j.submit({"op": "create", "name": "c", "parent": parent}, creates=True)
    assert parent.startswith(PLACEHOLDER) and child.startswith(PLACEHOLDER) and parent != child
    j.submit({"op": "put", "thing": child, "value": {"names": [parent, child, "plain"]}})
    assert j.resolve(child) == child  # not replayed yet

    store.up = True
    assert j.flush()
    real_parent, real_child = j.resolve(parent), j.resolve(child)
    assert (real_parent, real_child) == ("id0", "id1")
    assert store.things["id1"]["parent"] == "id0"
    assert store.things["id1"]["values"] == [{"names": ["id0", "id1", "plain"]}]
    assert json.loads(j.refs_path.read_text()) == {parent: "id0", child: "id1"}
    # Ops submitted later naming a placeholder reach the store with the real id.
    j.submit({"op": "put", "thing": child, "value": 9})
    assert store.things["id1"]["values"][-1] == 9
    # A new process reads the map back.
    assert journal(tmp_path / "j", FakeStore()).open().resolve(parent) == "id0"


def test_replay_after_a_crash_before_the_trim_changes_nothing(tmp_path):
    """A kill after ops were replayed but before the journal was trimmed: the same ops are replayed by
    the next process; a create whose placeholder is mapped is not applied again."""
    store = FakeStore()
    j = journal(tmp_path / "j", store).open()
    store.up = False
    a = j.submit({"op": "create", "name": "a"}, creates=True)
    j.submit({"op": "put", "thing": a, "value": 1})
    untrimmed = j.path.read_text()

    store.up = True
    assert j.flush()
    j.path.write_text(untrimmed)  # as if the trim never happened (the refs map was saved)
    again = journal(tmp_path / "j", store).open()
    assert again.pending == 2 and again.flush()
    assert list(store.things) == ["id0"] and store.things["id0"]["values"] == [1]
    assert [op for op, _, _ in store.log].count("create") == 1


def test_files_an_op_reads_are_copied_when_it_is_kept(tmp_path):
    store = FakeStore()
    j = journal(tmp_path / "j", store).open()
    a = j.submit({"op": "create", "name": "a"}, creates=True)
    note = tmp_path / "note.txt"
    note.write_text("kept")
    store.up = False
    j.submit({"op": "read", "thing": a, "path": str(note)}, files={"path": note})
    note.unlink()  # the caller's file is gone; the journal has a copy
    entry = json.loads(j.path.read_text().splitlines()[1])
    assert entry["path"] == "j_files/0/note.txt" and entry["files"] == ["path"]  # relative: the folder may move

    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "j"), moved)
    store.up = True
    assert journal(moved, store).open().flush()
    assert store.things[a]["values"] == ["kept"]
    assert not (moved / "j_files").exists()


def test_a_refused_op_is_raised_at_once_and_set_aside_on_replay(tmp_path):
    store = FakeStore()
    told = io.StringIO()
    j = journal(tmp_path / "j", store, stream=told).open()
    with pytest.raises(Refused):
        j.submit({"op": "bad"})
    assert j.pending == 0

    store.up = False
    j.submit({"op": "create", "name": "a"}, creates=True)
    j.submit({"op": "bad", "why": "x"})
    j.submit({"op": "put", "thing": "id0", "value": 2})
    store.up = True
    assert j.flush() and j.pending == 0
    assert store.things["id0"]["values"] == [2]  # the refused op blocked nothing behind it
    rejected = [json.loads(ln) for ln in j.rejected_path.read_text().splitlines()]
    assert [(r["op"], r["why"]) for r in rejected] == [("bad", "x")] and "refused" in rejected[0]["error"]
    assert f"refused a kept write (bad: op 'bad' refused); set aside in {j.rejected_path}" in told.getvalue()


def test_a_line_cut_short_by_a_kill_is_ignored(tmp_path):
    store = FakeStore()
    j = journal(tmp_path / "j", store).open()
    store.up = False
    j.submit({"op": "put", "thing": "x", "value": 1})
    with open(j.path, "a") as fh:
        fh.write('{"seq": 1, "op": "put", "thi')  # never acknowledged: submit had not returned
    again = journal(tmp_path / "j", store).open()
    assert again.pending == 1
