"""The embedded registry store: one SQLite file (WAL), for one machine (API and workers share the file).

    tasks(seq INTEGER PRIMARY KEY, name UNIQUE, record, tensors, digest)

One row per task; a change replaces its task's row by one with the next seq (removal: record NULL, a
tombstone), so a replica catches up with `seq > cursor` on the table's own key. 8 KB pages hold nine ~900-byte
rows with little slack (4 KB pages hold four): a prototype-mode task takes under 1 KB on disk (bench/scale.py).
Every change is one `BEGIN IMMEDIATE` transaction with `synchronous=FULL`: committed means on disk, and kill -9
at any point leaves the last commit whole. SQLite on a network file system is not safe: many replicas on many
machines use the redis store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

from .records import Change, RegisteredTask, RegistryError, check_name, digest, name_taken
from .store import PAGE

FILE = "registry.sqlite3"
SETUP_WAIT_S = 30.0  # as long as a writer waits for the write lock (the connection's busy timeout)
SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    record BLOB,
    tensors BLOB,
    digest BLOB
)
"""


class SqliteRegistry:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.where = f"registry {self.path}"
        self._lock = threading.Lock()  # one connection, shared by the threads of a process
        self._db: sqlite3.Connection | None = None  # opened on first use: a damaged file must not stop a start

    def _connection(self) -> sqlite3.Connection:
        """The open connection (caller holds the lock); RegistryError when the file cannot be opened."""
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                try:
                    _set_up(db)
                except sqlite3.Error:
                    db.close()
                    raise
            except (OSError, sqlite3.Error) as exc:
                raise RegistryError(f"{self.where} cannot be opened: {exc}") from exc
            self._db = db
            self._migrate(db)
        return self._db

    def _migrate(self, db: sqlite3.Connection) -> None:
        """A registry folder of the earlier layout (manifest.json + one safetensors file per task) next to an
        empty store is imported into it once, in one transaction; the manifest is then renamed
        `manifest.json.migrated` (the tensor files stay, for a rollback)."""
        manifest = self.path.parent / "manifest.json"
        if not manifest.exists() or db.execute("SELECT 1 FROM tasks LIMIT 1").fetchone() is not None:
            return
        try:
            tasks = json.loads(manifest.read_text())["tasks"]
            items = [_legacy(self.path.parent, entry) for entry in tasks.values()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self._db = None
            db.close()
            raise RegistryError(f"registry {manifest} (the earlier layout) cannot be imported: {exc}") from exc
        db.execute("BEGIN IMMEDIATE")
        for seq, (task, tensors) in enumerate(items, start=1):
            record = task.to_json()
            db.execute(
                "INSERT INTO tasks (seq, name, record, tensors, digest) VALUES (?, ?, ?, ?, ?)",
                (seq, task.name, record, tensors, bytes.fromhex(digest(record, tensors))),
            )
        db.execute("COMMIT")
        os.replace(manifest, manifest.with_name("manifest.json.migrated"))

    @classmethod
    def in_folder(cls, folder: str | Path) -> SqliteRegistry:
        return cls(Path(folder) / FILE)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._connection()
            try:
                db.execute("BEGIN IMMEDIATE")  # the write lock now: no other writer between read and write
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise RegistryError(f"{self.where}: {exc}") from exc

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            if self._db is None and not self.path.exists() and not (self.path.parent / "manifest.json").exists():
                return []  # nothing registered yet: reading creates no file (the first write does)
            db = self._connection()
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise RegistryError(f"{self.where} is unreadable or corrupt: {exc}") from exc

    def register(self, task: RegisteredTask, tensors: bytes, replace: bool = False) -> tuple[RegisteredTask, bool]:
        return self.register_many([(task, tensors)], replace)[0]

    def register_many(
        self, items: list[tuple[RegisteredTask, bytes]], replace: bool = False
    ) -> list[tuple[RegisteredTask, bool]]:
        """`register` for many tasks in one transaction (an import, a migration): all of them or none."""
        for task, _ in items:
            check_name(task.name)
        out = []
        with self._transaction() as db:
            seq = _next_seq(db) - 1
            for task, tensors in items:
                row = db.execute("SELECT record, seq FROM tasks WHERE name = ?", (task.name,)).fetchone()
                if row is not None and row[0] is not None:
                    stored = _stored(row[0], row[1])
                    if stored is not None and stored.job_id == task.job_id:
                        out.append((stored, False))
                        continue
                    if not replace:
                        raise name_taken(task.name)
                seq += 1
                record = task.to_json()
                db.execute(
                    "INSERT OR REPLACE INTO tasks (seq, name, record, tensors, digest) VALUES (?, ?, ?, ?, ?)",
                    (seq, task.name, record, tensors, bytes.fromhex(digest(record, tensors))),
                )
                task.seq = seq
                out.append((task, True))
        return out

    def remove(self, name: str) -> RegisteredTask | None:
        with self._transaction() as db:
            row = db.execute("SELECT record, seq FROM tasks WHERE name = ?", (name,)).fetchone()
            if row is None or row[0] is None:
                return None
            db.execute(
                "INSERT OR REPLACE INTO tasks (seq, name, record, tensors, digest) VALUES (?, ?, NULL, NULL, NULL)",
                (_next_seq(db), name),
            )
        try:
            return RegisteredTask.from_json(row[0], row[1])
        except (ValueError, TypeError):  # removing a corrupt record is how it is repaired
            return RegisteredTask(name=name, mode="unknown", job_id="", model_version="")

    def get(self, name: str) -> Change | None:
        rows = self._query("SELECT seq, name, record, tensors, digest FROM tasks WHERE name = ?", (name,))
        change = Change.read(self.where, *rows[0]) if rows else None
        return None if change is None or (change.task is None and change.error is None) else change

    def head(self) -> int:
        rows = self._query("SELECT COALESCE(MAX(seq), 0) FROM tasks")
        return int(rows[0][0]) if rows else 0

    def changes(self, after: int, limit: int = PAGE) -> list[Change]:
        rows = self._query(
            "SELECT seq, name, record, tensors, digest FROM tasks WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        )
        return [Change.read(self.where, *row) for row in rows]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _set_up(db: sqlite3.Connection) -> None:
    """WAL, full sync and the table. Processes opening a new file at once race for it: switching to WAL takes
    an exclusive lock that SQLite's busy handler does not wait for, so a "locked" answer is retried a while."""
    deadline = time.monotonic() + SETUP_WAIT_S
    while True:
        try:
            db.execute("PRAGMA page_size=8192")  # only takes effect on a new file
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")  # kept in the file: done once per file
            db.execute("PRAGMA synchronous=FULL")
            db.execute(SCHEMA)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _next_seq(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()[0]) + 1  # the table's last key


def _legacy(folder: Path, entry: dict) -> tuple[RegisteredTask, bytes]:
    """One task of a manifest.json registry: its record and its verified tensor file."""
    data = (folder / "tasks" / entry["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"tasks/{entry['file']} does not match its sha256")
    known = {f.name for f in fields(RegisteredTask)} - {"seq"}
    return RegisteredTask(**{k: v for k, v in entry.items() if k in known}), data


def _stored(record: bytes, seq: int) -> RegisteredTask | None:
    """The stored record, or None when it is unreadable (a corrupt record is replaced, never matched)."""
    try:
        return RegisteredTask.from_json(record, seq)
    except (ValueError, TypeError):
        return None
