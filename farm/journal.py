"""A durable, append-only log of operations on a store that may be down, replayed in order once it answers.

The journal knows nothing of what its operations do. An op is a JSON-able dict whose "op" key names it;
the journal is handed `apply(op, replay)`, which performs one op on the store and returns its result,
and `is_outage(err)`, which tells "the store could not do it now" (kept, retried later) from "the store
refuses this" (raised to the caller; set aside during a replay, where no caller waits).

- While the store answers, `submit` applies an op at once and returns what `apply` returned.
- When an op fails with an outage, that op and every later one (so that their order is kept) are
  appended to `<folder>/<name>.jsonl`: one JSON object per line after a header line, fsynced before
  `submit` returns, so an op is never acknowledged and then lost. Files an op reads are copied into
  `<name>_files/<seq>/` (its caller may delete them: temporary folders, checkpoints Tune removes).
  The user is told once per outage on the stream, with the journal's path.
- Later submits (and `maybe_flush`, for callers that go quiet) retry the store with exponential
  backoff; `flush` retries at once. When it answers, the kept ops are applied in order, the file is
  trimmed as they go (removed once empty), and the user is told.
- During a replay, an op the store refuses for good is set aside in `<name>_rejected.jsonl` and named
  on the stream; it never blocks the ops behind it.

Replay is idempotent provided `apply` is when told replay=True (an op may be applied twice: a crash
between applying it and trimming the file). An op that creates something is submitted with
creates=True: it carries a placeholder id (`pending-<hex>`, in op["ref"]), which `submit` hands back
while the op is kept. Its replay maps the placeholder to what `apply` returned (the real id), kept in
`<name>_refs.json`; a create whose placeholder is mapped already is not applied again, and every op
applied afterwards has each string value equal to a mapped placeholder (at any depth) replaced by the
real id.

Constructing a journal does no I/O; `open()` reads what an earlier process left (pending ops, the
placeholder map). Optuna's journal storage (an append-only log that a storage replays) has the same
shape; this one adds the outage handling and placeholders.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

PLACEHOLDER = "pending-"
FORMAT = 1  # the header's "journal" field: bump when entries change incompatibly


def read_header(path: str | Path) -> dict | None:
    """A journal file's header (its first line: what the ops are for, e.g. the store), or None."""
    try:
        with open(path) as fh:
            header = json.loads(fh.readline())
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) and "journal" in header else None


def fsync_write(path: Path, text: str) -> None:
    """Replace a file's content atomically and durably (a kill leaves the old or the new, never half)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _any_os_error(err: BaseException) -> bool:
    return isinstance(err, (OSError, TimeoutError))


class Journal:
    """An append-only op log in `folder`, applied through `apply` (see the module's docstring).

    name: the files' stem (`<name>.jsonl`, `<name>_refs.json`, `<name>_files/`, `<name>_rejected.jsonl`);
    header: what the ops are for, written as the file's first line (read back by `read_header`);
    probe: a cheap "does the store answer?" asked before a replay (None: the replay itself tells);
    label, noun: how messages name the store and one op ("physfarm: <label>: ... 3 <noun>(s) kept").
    """

    def __init__(self, folder: str | Path, apply: Callable[[dict, bool], Any], *, name: str = "journal",
                 header: dict | None = None, is_outage: Callable[[BaseException], bool] = _any_os_error,
                 probe: Callable[[], bool] | None = None, label: str = "store", noun: str = "write",
                 stream=None, retry_min_s: float = 2.0, retry_max_s: float = 60.0):
        self.folder = Path(folder)
        self.path = self.folder / f"{name}.jsonl"
        self.refs_path = self.folder / f"{name}_refs.json"
        self.files_dir = self.folder / f"{name}_files"
        self.rejected_path = self.folder / f"{name}_rejected.jsonl"
        self.apply = apply
        self.header = {"journal": FORMAT, **(header or {})}
        self.is_outage = is_outage
        self.probe = probe
        self.label = label
        self.noun = noun
        self.stream = stream
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.replayed = 0  # ops replayed by this object
        self._lock = threading.RLock()
        self._opened = False
        self._pending: list[dict] = []
        self._refs: dict[str, Any] = {}
        self._seq = 0
        self._delay = retry_min_s
        self._next_try = 0.0
        self._told_down = False
        self._announced = False
        self._why = ""

    # ------------------------------------------------------------------ opening
    def open(self) -> Journal:
        """Read the ops an earlier process kept and its placeholder map; returns the journal."""
        with self._lock:
            self._refs, self._pending, self._seq = {}, [], 0
            if self.refs_path.exists():
                try:
                    self._refs = json.loads(self.refs_path.read_text())
                except ValueError:  # cut short by a kill: the ops it maps are found again on replay
                    self._refs = {}
            if self.path.exists():
                for line in self.path.read_text().splitlines():
                    try:
                        entry = json.loads(line)
                    except ValueError:  # a line cut short by a kill mid-write: never acknowledged
                        continue
                    if isinstance(entry, dict) and "op" in entry:
                        self._pending.append(entry)
                        self._seq = max(self._seq, int(entry.get("seq", 0)) + 1)
            self._opened = True
        return self

    def _require_open(self) -> None:
        if not self._opened:
            raise RuntimeError(f"journal {self.path}: not opened; call open() first (it reads the ops an "
                               f"earlier process kept, which must be replayed before new ones)")

    # ------------------------------------------------------------------ state
    @property
    def pending(self) -> int:
        return len(self._pending)

    def resolve(self, value: Any) -> Any:
        """The real id for a placeholder whose create was replayed (any other value as it is)."""
        return self._refs.get(value, value) if isinstance(value, str) else value

    def _resolved(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._refs.get(value, value)
        if isinstance(value, list):
            return [self._resolved(v) for v in value]
        if isinstance(value, dict):
            return {k: self._resolved(v) for k, v in value.items()}
        return value

    def say(self, text: str) -> None:
        print(f"physfarm: {self.label}: {text}", file=self.stream or sys.stderr, flush=True)

    # ------------------------------------------------------------------ submitting
    def submit(self, op: dict, *, creates: bool = False,
               files: dict[str, str | Path | list[str | Path]] | None = None) -> Any:
        """Apply `op` now, or keep it when the store is down (or ops are still kept before it).

        creates: the op makes something whose id later ops name: it gets a placeholder (op["ref"]),
        returned instead of `apply`'s result while it is kept.
        files: {arg: path} (a file: op[arg] becomes the path of its copy) or {arg: [paths]} (op[arg]
        becomes the folder holding their copies), copied only when the op is kept; a kept op's copies
        are named relative to the journal's folder, so a journal moved elsewhere still replays.
        Returns apply's result, or (kept) the placeholder for a create and None otherwise."""
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise ValueError(f"journal op {op!r}: expected a dict whose 'op' key names the operation")
        self._require_open()
        with self._lock:
            op = dict(op)
            if creates:
                op.setdefault("ref", PLACEHOLDER + uuid.uuid4().hex)
            if self._pending:
                self.maybe_flush()
            if not self._pending:
                try:
                    return self.apply(self._resolved(op), False)
                except Exception as err:  # noqa: BLE001 - classified: an outage is kept, a refusal raised
                    if not self.is_outage(err):
                        raise
                    self._went_down(err)
            self._keep(op, files or {})
            self._announce()
            return op["ref"] if creates else None

    def _keep(self, op: dict, files: dict) -> None:
        seq = self._seq
        self._seq += 1
        entry = {"seq": seq, "t": time.time(), **op}
        if files:
            for arg, paths in files.items():
                if isinstance(paths, (str, Path)):
                    entry[arg] = self._copy(seq, [Path(paths)])[0]
                else:
                    self._copy(seq, [Path(p) for p in paths])
                    entry[arg] = f"{self.files_dir.name}/{seq}"
            entry["files"] = sorted(files)
        self._pending.append(entry)
        self._append(entry)
        if self._told_down and len(self._pending) in (100, 1000, 10000):
            self.say(f"still unreachable; {len(self._pending)} {self.noun}s kept in {self.path}")

    def _copy(self, seq: int, paths: list[Path]) -> list[str]:
        dest = self.files_dir / str(seq)
        dest.mkdir(parents=True, exist_ok=True)
        out = []
        for p in paths:
            shutil.copy2(p, dest / p.name)
            out.append(f"{self.files_dir.name}/{seq}/{p.name}")
        return out

    def _header_line(self) -> str:
        return json.dumps(self.header) + "\n"

    def _append(self, entry: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a") as fh:
            if new:
                fh.write(self._header_line())
            fh.write(json.dumps(entry, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _rewrite(self) -> None:
        """Trim the file to what is still pending (removed, with the kept files, once empty)."""
        if not self._pending:
            if self.path.exists():
                self.path.unlink()
            shutil.rmtree(self.files_dir, ignore_errors=True)
            return
        fsync_write(self.path, self._header_line()
                    + "".join(json.dumps(e, default=str) + "\n" for e in self._pending))
        keep = {str(e["seq"]) for e in self._pending}
        if self.files_dir.is_dir():
            for sub in self.files_dir.iterdir():
                if sub.name not in keep:
                    shutil.rmtree(sub, ignore_errors=True)

    def _save_refs(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fsync_write(self.refs_path, json.dumps(self._refs, indent=1))

    # ------------------------------------------------------------------ outages
    def _went_down(self, err: BaseException) -> None:
        self._next_try = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.retry_max_s)
        if not self._told_down:
            self._told_down = True
            line = str(err).strip().splitlines()
            self._why = line[0][:200] if line else type(err).__name__

    def _announce(self) -> None:
        """Told once per outage, after its first op is kept (so the count is right)."""
        if self._told_down and not self._announced:
            self._announced = True
            self.say(f"unreachable ({self._why}); training goes on. {len(self._pending)} {self.noun}(s) kept "
                     f"so far in {self.path}, replayed in order when it answers again (retrying with backoff)")

    # ------------------------------------------------------------------ replay
    def maybe_flush(self) -> bool:
        """Replay the kept ops if the backoff allows; True when nothing is pending afterwards."""
        self._require_open()
        with self._lock:
            if not self._pending:
                return True
            if time.monotonic() < self._next_try:
                return False
            return self._replay()

    def flush(self, wait_s: float = 0.0, poll_s: float = 2.0) -> bool:
        """Replay now (ignoring the backoff), trying again for up to wait_s; True when nothing is pending."""
        self._require_open()
        deadline = time.monotonic() + wait_s
        with self._lock:
            while True:
                if not self._pending or self._replay():
                    return True
                if time.monotonic() + poll_s > deadline:
                    return False
                time.sleep(poll_s)

    def _replay(self) -> bool:
        if self.probe is not None and not self.probe():
            self._went_down(ConnectionError("health check failed"))
            return False
        done = 0
        try:
            while self._pending:
                entry = self._pending[0]
                try:
                    self._apply_kept(entry)
                except Exception as err:  # noqa: BLE001
                    if self.is_outage(err):
                        raise
                    self._reject(entry, err)  # refused for good: set aside, never blocks the rest
                self._pending.pop(0)
                done += 1
                if done % 50 == 0:
                    self._rewrite()
        except Exception as err:  # noqa: BLE001 - an outage again: keep the rest for later
            self._rewrite()
            self._went_down(err)
            self.replayed += done
            return False
        self._rewrite()
        self.replayed += done
        self._delay = self.retry_min_s
        if done:
            self.say(f"answers again; replayed {done} kept {self.noun}s from {self.path}")
        self._told_down = self._announced = False
        return True

    def _apply_kept(self, entry: dict) -> None:
        ref = entry.get("ref")
        if ref is not None and ref in self._refs:
            return  # created already (replayed before a crash cut the trim short)
        op = {k: v for k, v in entry.items() if k not in ("seq", "t", "files")}
        op = self._resolved(op)
        for arg in entry.get("files", ()):
            if op.get(arg):
                op[arg] = str(self.folder / op[arg])  # an absolute path stays as it is
        result = self.apply(op, True)
        if ref is not None:
            self._refs[ref] = result
            self._save_refs()

    def _reject(self, entry: dict, err: BaseException) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.rejected_path, "a") as fh:
            fh.write(json.dumps({**entry, "error": str(err)[:2000]}, default=str) + "\n")
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        self.say(f"refused a kept write ({entry['op']}: {first}); set aside in {self.rejected_path}")
