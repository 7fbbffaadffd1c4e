"""The task catalogue: every task the server can answer, and the prototype the router and hypernetwork use.

It starts with the model's trained tasks. `upsert` and `remove` are the hook through which tasks added at run
time arrive (the adaptation issue feeds them from its registry): each change bumps `version`, patches the FAISS
index (copy-on-write, see routing.py) and tells subscribers, so the adapter cache can drop a task's stale
adapters. The registry, not this in-memory catalogue, is the source of truth of adapted tasks.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Literal

import numpy as np

from pha_core.calibration import Spread
from pha_core.inference import AdapterSet
from pha_core.scoring import AnswerSpace
from pha_core.tasks import TASKS, template_fields, template_pattern

from .routing import PrototypeIndex

Source = Literal["trained", "adapted"]


@dataclass(frozen=True)
class TaskEntry:
    """One task.

    `vector` is the prototype the hypernetwork reads. `key` is the routing key in z space when it differs (tasks
    adapted with pha_core.adapt carry both: `AdaptResult.prototype` and `.key`); for trained tasks the prototype is
    also the routing key (Eq. 10). `adapters` holds explicit adapters (adaptation modes "adapter"/"scratch"),
    served as they are instead of being generated from `vector`.
    """

    name: str
    source: Source
    vector: np.ndarray = field(repr=False)
    template: str | None = None
    labels: tuple[str, ...] | None = None
    created: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    examples: int | None = None
    version: int = 1
    key: np.ndarray | None = field(default=None, repr=False)
    adapters: AdapterSet | None = field(default=None, repr=False)
    spread: Spread | None = None  # where its held-out rows' route cosines lie (typicality); None: not fitted

    @property
    def answers(self) -> AnswerSpace | None:
        """What the task answers with: its label words (rank classification; a known task's own, e.g. STS-B's
        0.2 bins), or None: free generation."""
        if self.source == "trained" and self.name in TASKS:
            return AnswerSpace.of_task(self.name)
        return AnswerSpace.of_labels(self.labels)

    @property
    def routing_key(self) -> np.ndarray:
        return self.vector if self.key is None else self.key

    @property
    def prototype_version(self) -> str:
        """A digest of what the adapters are made from: a cache key part that can never name other adapters."""
        digest = hashlib.sha256(np.ascontiguousarray(self.vector, dtype=np.float32).tobytes())
        if self.adapters is not None:
            digest.update(self.adapters.to_bytes())
        return digest.hexdigest()[:16]

    def same_as(self, other: TaskEntry) -> bool:
        """Same adapters and same routing key (what an idempotent re-registration must not change)."""
        return self.prototype_version == other.prototype_version and np.array_equal(self.routing_key, other.routing_key)


# listener(old, new): old is None for a new task, new is None for a removed one.
Listener = Callable[[TaskEntry | None, TaskEntry | None], None]


def trained_entries(
    tasks: list[str],
    prototypes: np.ndarray,
    created: datetime,
    examples: int | None = None,
    spreads: Mapping[str, Spread] | None = None,
) -> list[TaskEntry]:
    """Entries for a model's trained tasks; template and labels come from the task catalogue when known."""
    entries = []
    for name, vector in zip(tasks, prototypes, strict=True):
        spec = TASKS.get(name)
        entries.append(
            TaskEntry(
                name=name,
                source="trained",
                vector=np.array(vector, dtype=np.float32),
                template=spec.template if spec else None,
                labels=spec.labels if spec else None,
                created=created,
                examples=examples,
                spread=(spreads or {}).get(name),
            )
        )
    return entries


@dataclass(frozen=True)
class _TemplateIndex:
    """The tasks of one catalogue version by how their inputs are written."""

    version: int
    by_fields: dict[frozenset[str], dict[str, tuple[str, ...]]]  # fields -> {template: names}
    patterns: list[tuple[re.Pattern[str], tuple[str, ...]]]  # (what the template's texts look like, names)
    free: tuple[str, ...]  # tasks without a template: they take any text

    @classmethod
    def of(cls, version: int, entries: Iterable[TaskEntry]) -> _TemplateIndex:
        by_template: dict[str, tuple[str, ...]] = {}
        free = []
        for entry in entries:
            if entry.template:
                by_template[entry.template] = (*by_template.get(entry.template, ()), entry.name)
            else:
                free.append(entry.name)
        by_fields: dict[frozenset[str], dict[str, tuple[str, ...]]] = {}
        for template, names in by_template.items():
            by_fields.setdefault(frozenset(template_fields(template)), {})[template] = names
        patterns = [(template_pattern(t), names) for t, names in by_template.items()]
        return cls(version, by_fields, patterns, tuple(free))


class TaskCatalog:
    """Tasks by name, kept in step with a `PrototypeIndex`. Thread-safe; reads never block on the index."""

    def __init__(self, index: PrototypeIndex, entries: Iterable[TaskEntry] = ()) -> None:
        self.index = index
        self._lock = threading.Lock()
        self._entries = {e.name: e for e in entries}
        self._listeners: list[Listener] = []
        self.version = 1
        self._template_index = _TemplateIndex.of(0, ())
        index.replace_all({name: e.routing_key for name, e in self._entries.items()})

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> TaskEntry | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[TaskEntry]:
        return list(self._entries.values())

    def templates_taking(self, fields: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """{template: task names} for the templates whose placeholders are exactly `fields` (structured inputs)."""
        return self._templates().by_fields.get(frozenset(fields), {})

    def tasks_fitting(self, text: str) -> tuple[str, ...] | None:
        """The tasks a plain text may be routed among: those whose template it is written with, and those
        without a template; None when that is every task. Empty: no task takes a text written so."""
        index = self._templates()
        if not index.patterns:
            return None
        fitting = [name for pattern, names in index.patterns if pattern.fullmatch(text) for name in names]
        if len(fitting) + len(index.free) == len(self._entries):
            return None
        return (*fitting, *index.free)

    def _templates(self) -> _TemplateIndex:
        """The tasks by template, built once per catalogue version: a request costs lookups, not a scan of
        every task."""
        index = self._template_index
        if index.version != self.version:
            index = _TemplateIndex.of(self.version, self._entries.values())
            self._template_index = index
        return index

    def field_sets(self) -> list[list[str]]:
        """Every template's fields, for error messages."""
        return sorted({template_fields(e.template) for e in self._entries.values() if e.template})

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def upsert(
        self,
        name: str,
        vector: np.ndarray,
        *,
        key: np.ndarray | None = None,
        adapters: AdapterSet | None = None,
        template: str | None = None,
        labels: Iterable[str] | None = None,
        examples: int | None = None,
        spread: Spread | None = None,
    ) -> TaskEntry:
        """Add or replace an adapted task. Idempotent: the same task again changes nothing (jobs may re-run)."""
        new = TaskEntry(
            name=name,
            source="adapted",
            vector=np.array(vector, dtype=np.float32).reshape(-1),
            key=None if key is None else np.array(key, dtype=np.float32).reshape(-1),
            adapters=adapters,
            template=template,
            labels=tuple(labels) if labels is not None else None,
            examples=examples,
            spread=spread,
        )
        with self._lock:
            old = self._entries.get(name)
            if old is not None and old.source == "trained":
                raise ValueError(f"{name!r} is a trained task of the model; give the adapted task another name")
            if old is not None and old.same_as(new):
                return old
            self.index.upsert(name, new.routing_key)  # validates dims and values before anything changes
            new = replace(new, version=self.version + 1, created=old.created if old is not None else new.created)
            self._entries = {**self._entries, name: new}  # readers iterate a dict that is never mutated
            self.version += 1
        self._notify(old, new)
        return new

    def remove(self, name: str) -> TaskEntry | None:
        """Remove an adapted task; returns it, or None when there was none. Trained tasks cannot be removed."""
        with self._lock:
            old = self._entries.get(name)
            if old is None:
                return None
            if old.source == "trained":
                raise ValueError(f"{name!r} is a trained task of the model and cannot be removed")
            self.index.remove(name)
            self._entries = {k: v for k, v in self._entries.items() if k != name}
            self.version += 1
        self._notify(old, None)
        return old

    def _notify(self, old: TaskEntry | None, new: TaskEntry | None) -> None:
        for listener in self._listeners:
            listener(old, new)
