"""The registry's contract: an append-only change log with a sequence number, over any engine.

Each change (a registration, a replacement, a removal) gets the next sequence number and rewrites only its own
task's row, so a change costs the same with ten tasks or a million. A replica remembers the last sequence number
it applied and reads only the changes after it (`changes`); a fresh replica reads from 0, which is the compact
snapshot (one row per task, removed tasks as tombstones). Engines: `sqlite` (embedded, one machine; the
default) and `redis` (many replicas; Redis with AOF persistence). Both pass tests/adaptation/test_registry.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from .records import Change, RegisteredTask

PAGE = 1000  # changes read per query while catching up: bounded memory, few round trips


class RegistryStore(Protocol):
    where: str  # names the store in messages ("registry /data/registry.sqlite3", "registry redis://...")

    def register(self, task: RegisteredTask, tensors: bytes, replace: bool = False) -> tuple[RegisteredTask, bool]:
        """Store the task as one change; returns (stored, created). The same job id again returns the stored
        record (at-least-once delivery registers once); another job for a live name needs `replace`, else
        `NameTaken`."""
        ...

    def remove(self, name: str) -> RegisteredTask | None:
        """Remove a task (a tombstone change); None when there was none."""
        ...

    def get(self, name: str) -> Change | None:
        """The task's current row (None: never registered or removed; `error` set: corrupt)."""
        ...

    def head(self) -> int:
        """The sequence number of the last change (0: none yet)."""
        ...

    def changes(self, after: int, limit: int = PAGE) -> list[Change]:
        """Up to `limit` changes with seq > `after`, in order; each task at most once (its latest state)."""
        ...

    def close(self) -> None: ...


def pages(store: RegistryStore, after: int = 0) -> Iterator[list[Change]]:
    """Every change after `after`, a page at a time (pages are never empty)."""
    while True:
        page = store.changes(after)
        if page:
            yield page
        if len(page) < PAGE:
            return
        after = page[-1].seq


def all_changes(store: RegistryStore, after: int = 0) -> Iterator[Change]:
    """Every change after `after`, one at a time."""
    for page in pages(store, after):
        yield from page


def live(store: RegistryStore) -> dict[str, Change]:
    """Every task the registry holds now, readable or not (O(N): for small tools and tests, not replicas)."""
    return {c.name: c for c in all_changes(store) if c.task is not None or c.error is not None}
