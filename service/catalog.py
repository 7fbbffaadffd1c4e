"""The task catalogue: every task the server can answer, and the prototype the router and hypernetwork use.

It starts with the model's trained tasks. `upsert` and `remove` are the hook through which tasks added at run
time arrive (the adaptation issue feeds them from its registry): each change bumps `version`, patches the FAISS
index (copy-on-write, see routing.py) and tells subscribers, so the adapter cache can drop a task's stale
adapters. The registry, not this in-memory catalogue, is the source of truth of adapted tasks.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

import numpy as np

from pha_core.calibration import Spread
from pha_core.inference import AdapterSet
from pha_core.scoring import AnswerSpace
from pha_core.tasks import TASKS, template_fields, template_pattern

from .registry import name_taken
from .routing import Group, PrototypeIndex

Source = Literal["trained", "adapted"]


@dataclass(slots=True)
class TaskEntry:
    """One task. Read-only once published: the catalogue replaces an entry, never edits a served one. (Not a
    frozen dataclass: a fresh replica builds a million of them, and a frozen one's 14 fields cost 2.6 us to set
    where a plain one's cost 0.4.)

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
    # per label, added to its log-likelihood (label_prior.py); None: none
    label_offsets: tuple[float, ...] | None = None
    # divides the label log-likelihoods before the softmax (label_prior.py): fitted for trained tasks, else 1
    label_temperature: float = 1.0

    @property
    def answers(self) -> AnswerSpace | None:
        """What the task answers with: its label words (rank classification; a known task's own, e.g. STS-B's
        0.2 bins) with the label prior it was fitted with, or None: free generation."""
        if self.source == "trained" and self.name in TASKS:
            return AnswerSpace.of_task(self.name, self.label_offsets, self.label_temperature)
        return AnswerSpace.of_labels(self.labels, self.label_offsets, self.label_temperature)

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


@dataclass(frozen=True)
class _Shapes:
    """How the catalogue's inputs are written: its templates by their fields and as patterns (re-made only
    when a template comes or goes, so a request costs lookups, not a scan of every task)."""

    by_fields: dict[frozenset[str], list[str]]
    patterns: list[tuple[str, re.Pattern[str]]]
    free: bool  # some tasks have no template: they take any text

    @classmethod
    def of(cls, templates: Iterable[str | None]) -> _Shapes:
        named = sorted(t for t in templates if t)
        by_fields: dict[frozenset[str], list[str]] = {}
        for template in named:
            by_fields.setdefault(frozenset(template_fields(template)), []).append(template)
        free = any(t is None or t == "" for t in templates)
        return cls(by_fields, [(t, template_pattern(t)) for t in named], free)


def _offsets(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(x) for x in values)


def trained_entries(
    tasks: list[str],
    prototypes: np.ndarray,
    created: datetime,
    examples: int | None = None,
    spreads: Mapping[str, Spread] | None = None,
    label_offsets: Mapping[str, Sequence[float]] | None = None,
    label_temperatures: Mapping[str, float] | None = None,
) -> list[TaskEntry]:
    """Entries for a model's trained tasks; template and labels come from the task catalogue when known, the
    label prior (`label_offsets` and `label_temperatures`, per task) from the checkpoint's label_prior.json."""
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
                label_offsets=_offsets((label_offsets or {}).get(name)),
                label_temperature=float((label_temperatures or {}).get(name, 1.0)),
            )
        )
    return entries


class TaskCatalog:
    """Tasks by name, kept in step with a `PrototypeIndex`. Thread-safe: a change is O(1) (the entries are
    patched in place under a lock; a read is one dict lookup, atomic under the GIL), so a million tasks cost a
    change no more than ten."""

    def __init__(self, index: PrototypeIndex, entries: Iterable[TaskEntry] = ()) -> None:
        self.index = index
        self._lock = threading.Lock()
        self._entries: dict[str, TaskEntry] = {}
        self._listeners: list[Listener] = []
        self.version = 1
        self._templates: dict[str | None, int] = {}  # template (None: none) -> how many tasks are written with it
        self._shapes = _Shapes.of(())
        for entry in entries:
            self._entries[entry.name] = entry
            self._count(entry.template, +1)
        index.replace_all((e.name, e.routing_key, e.template) for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> TaskEntry | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def conflict(self, name: str, replace: bool) -> str | None:
        """Why an adapted task may not take `name` (None: it may): the one rule the API, the import and the
        worker's registry apply (a trained task's name is never given away; a live one only with replace)."""
        served = self._entries.get(name)
        if served is not None and served.source == "trained":
            return f"{name!r} is a trained task of the model; choose another name"
        if served is not None and not replace:
            return str(name_taken(name))
        return None

    def some_names(self, limit: int = 20) -> str:
        """Task names for an error message: all of them when few, else the first `limit` and how many more."""
        with self._lock:
            names = sorted(self._entries) if len(self._entries) <= limit else list(self._entries)[:limit]
        more = len(self._entries) - len(names)
        return ", ".join(names) + (f" and {more} more (GET /prototypes)" if more > 0 else "")

    def page(self, offset: int, limit: int) -> tuple[list[TaskEntry], int]:
        """Entries offset..offset+limit in the order they were added, and how many there are."""
        with self._lock:
            return list(itertools.islice(self._entries.values(), offset, offset + limit)), len(self._entries)

    def entries(self) -> list[TaskEntry]:
        with self._lock:
            return list(self._entries.values())

    def templates_taking(self, fields: Iterable[str]) -> list[str]:
        """The templates whose placeholders are exactly `fields` (structured inputs)."""
        return self._shapes.by_fields.get(frozenset(fields), [])

    def tasks_fitting(self, text: str) -> tuple[Group, ...] | None:
        """The task groups (routing.Group: templates, None for tasks without one) a plain text may be routed
        among: the templates it is written with, and the tasks without a template; None when that is every
        group. Empty: no task takes a text written so."""
        shapes = self._shapes
        if not shapes.patterns:
            return None
        fitting = [template for template, pattern in shapes.patterns if pattern.fullmatch(text)]
        if len(fitting) == len(shapes.patterns):
            return None
        return (*fitting, None) if shapes.free else tuple(fitting)

    def field_sets(self) -> list[list[str]]:
        """Every template's fields, for error messages."""
        return sorted({template_fields(t) for t, _ in self._shapes.patterns})

    def _count(self, template: str | None, delta: int) -> None:
        """Track how many tasks each template has; the shapes are re-made only when a template comes or goes."""
        n = self._templates.get(template, 0) + delta
        if n > 0:
            self._templates[template] = n
        else:
            self._templates.pop(template, None)
        if (n == 1 and delta > 0) or n == 0:
            self._shapes = _Shapes.of(self._templates)

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
        label_offsets: Iterable[float] | None = None,
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
            label_offsets=tuple(label_offsets) if label_offsets is not None else None,
        )
        return self.upsert_many([new])[0]

    def upsert_many(self, entries: list[TaskEntry], keys: np.ndarray | None = None) -> list[TaskEntry]:
        """Add or replace adapted tasks in one index update (a replica catching up applies a page at a time).
        Entries equal to the served ones change nothing; every vector is checked before anything changes.
        `keys`: their routing keys already stacked [N, dim] (row i is entry i's), else stacked here."""
        unique = list({e.name: e for e in entries}.values())  # a name twice: its last state
        if keys is None or len(unique) != len(entries):
            keys = None
        entries = unique
        with self._lock:
            changed: list[tuple[TaskEntry | None, TaskEntry]] = []
            served, rows = [], []
            for row, new in enumerate(entries):
                old = self._entries.get(new.name)
                if old is not None and old.source == "trained":
                    raise ValueError(self.conflict(new.name, replace=True))
                if old is not None and old.same_as(new) and _metadata(old) == _metadata(new):
                    served.append(old)
                    continue
                if new.source != "adapted":
                    raise ValueError(f"{new.name!r}: only adapted tasks are added at run time")
                # Not yet published, so set in place (a copy per task costs a replica catching up seconds).
                new.version = self.version + 1 + len(changed)
                if old is not None:
                    new.created = old.created
                changed.append((old, new))
                rows.append(row)
                served.append(new)
            news = [new for _, new in changed]  # every key is checked before anything changes
            if keys is None:
                self.index.upsert_many((new.name, new.routing_key, new.template) for new in news)
            elif news:
                stacked = keys if len(rows) == len(keys) else keys[rows]
                self.index.add_columns([new.name for new in news], stacked, [new.template for new in news])
            for old, new in changed:
                self._entries[new.name] = new
                if old is not None:
                    self._count(old.template, -1)
                self._count(new.template, +1)
            self.version += len(changed)
        for old, new in changed:
            self._notify(old, new)
        return served

    def remove(self, name: str) -> TaskEntry | None:
        """Remove an adapted task; returns it, or None when there was none. Trained tasks cannot be removed."""
        with self._lock:
            old = self._entries.get(name)
            if old is None:
                return None
            if old.source == "trained":
                raise ValueError(self.conflict(name, replace=True))
            self.index.remove(name)
            del self._entries[name]
            self._count(old.template, -1)
            self.version += 1
        self._notify(old, None)
        return old

    def _notify(self, old: TaskEntry | None, new: TaskEntry | None) -> None:
        for listener in self._listeners:
            listener(old, new)


def _metadata(entry: TaskEntry) -> tuple:
    return entry.template, entry.labels, entry.spread, entry.examples, entry.label_offsets, entry.label_temperature
