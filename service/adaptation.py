"""The API side of adaptation: keeping the catalogue in step with the registry, on every replica.

The registry (registry/store.py) is the source of truth: a log of changes with sequence numbers. A replica
remembers the last one it applied (`RegistrySync.version`) and applies only the changes after it, a page at a
time: a new task costs every replica one row read and one index patch, however many tasks there are. It runs
at start-up (a fresh replica reads from 0: the snapshot), on each Redis notice from a worker or another
replica, and every `registry_poll_seconds` in case a notice was missed.

A corrupt record is refused and named (`/readyz` registry_error, pha_registry_errors_total); the task keeps its
last good version, if it had one, and every other change is applied. A store that cannot be read at all
changes nothing: the replica serves what it has and tries again on the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import threading
from datetime import datetime, timezone

import numpy as np
import redis.asyncio as aioredis

from pha_core.adapt import AdaptedTensors, vectors_of_many
from pha_core.calibration import Spread
from pha_core.scoring import AnswerSpace

from .catalog import TaskCatalog, TaskEntry
from .redis_client import connect_async
from .redis_names import REGISTRY_CHANNEL
from .registry import PAGE, Change, RegistryStore, pages
from .telemetry import Metrics

log = logging.getLogger("pha.adaptation")
Vectors = tuple[np.ndarray, np.ndarray]  # a task's prototype and routing key


class RegistrySync:
    def __init__(
        self, registry: RegistryStore, catalog: TaskCatalog, model_version: str, n_layers: int, metrics: Metrics
    ) -> None:
        self.metrics = metrics
        self.registry = registry
        self.catalog = catalog
        self.model_version = model_version
        self.n_layers = n_layers
        self.version = -1  # the last change applied; -1: nothing read yet
        self.refused: dict[str, str] = {}  # task -> why its stored record is not served
        self.store_error: str | None = None
        self._lock = threading.Lock()  # one apply at a time (start-up, notices, polls and the API's own writes)
        self._labels: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple per distinct label set

    @property
    def error(self) -> str | None:
        """What is wrong now: the store unreadable, or the records refused (named)."""
        if self.store_error is not None:
            return self.store_error
        if self.refused:
            names = sorted(self.refused)
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            return "; ".join(self.refused[n] for n in names[:5]) + more
        return None

    def apply(self) -> int:
        """Apply every change after the last one applied; returns the version now served. Raises nothing.

        A fresh replica (nothing applied yet) reads the whole log first and adds it to the catalogue at once:
        one index build instead of a million patches."""
        with self._lock, _no_collection(self.version < 0):
            fresh = self.version < 0
            pending: list[TaskEntry] = []
            try:
                for page in pages(self.registry, max(self.version, 0)):
                    vectors = vectors_of_many([c.tensors if c.task is not None else None for c in page])
                    for change, decoded in zip(page, vectors, strict=True):
                        pending = self._apply(change, decoded, pending, publish=not fresh)
                        self.version = max(self.version, change.seq)
                self._flush(pending)
                if fresh:
                    _release_memory()
            except Exception as exc:  # noqa: BLE001 - RegistryError, a bad page: an escape would end the follower
                self.store_error = str(exc) if str(exc).startswith("registry") else f"{type(exc).__name__}: {exc}"
                self.metrics.registry_errors.inc()
                log.error("registry not read; serving what was applied", extra={"error": str(exc)})
                if fresh:
                    self.version = -1  # nothing was published: start again from the beginning
                else:
                    self._flush(pending)
                return self.version
            self.version = max(self.version, 0)
            self.store_error = None
            self.metrics.registry_version.set(self.version)
            return self.version

    def _apply(
        self, change: Change, vectors: Vectors | None, pending: list[TaskEntry], publish: bool
    ) -> list[TaskEntry]:
        """Take one change (`vectors`: its prototype and key when read with its page): upserts gather in
        `pending` (published a page at a time, or all at the end for a fresh replica); a removal publishes what
        is pending first, so the order of changes is kept."""
        if change.task is None and change.error is None:  # removed
            self._flush(pending)
            self.refused.pop(change.name, None)
            served = self.catalog.get(change.name)
            if served is not None and served.source == "adapted":
                self.catalog.remove(change.name)
            return []
        entry = self._entry(change, vectors)
        if entry is not None:
            pending.append(entry)
        if publish and len(pending) >= PAGE:
            self._flush(pending)
            return []
        return pending

    def _flush(self, entries: list[TaskEntry]) -> None:
        """Publish the entries whose routing keys the index takes; refuse (and name) the others."""
        if not entries:
            return
        keys = np.stack([e.routing_key for e in entries])  # once: checked here, indexed as they are
        ok = self.catalog.index.valid(keys)
        good = entries
        if not ok.all():
            for entry in (e for e, fine in zip(entries, ok, strict=True) if not fine):
                why = "is not servable: its key is not finite or zero"
                self._refuse(entry.name, f"registry record {entry.name!r} {why}")
            good, keys = [e for e, fine in zip(entries, ok, strict=True) if fine], keys[ok]
        self.catalog.upsert_many(good, keys)
        entries.clear()

    def _entry(self, change: Change, vectors: Vectors | None) -> TaskEntry | None:
        """The catalogue entry a change asks for; None for a refused or a foreign record."""
        if change.error is not None:
            self._refuse(change.name, change.error)
            return None
        task = change.task
        served = self.catalog.get(task.name)
        if served is not None and served.source == "trained":
            self._refuse(task.name, f"registry record {task.name!r} names a trained task of the model; not served")
            return None
        if task.model_version != self.model_version:
            log.warning(
                "registry task was adapted on another model; not served",
                extra={"task": task.name, "task_model": task.model_version},
            )
            return None
        try:
            if vectors is not None:
                tensors = AdaptedTensors(*vectors, None)
            else:
                tensors = AdaptedTensors.from_bytes(change.tensors or b"", self.n_layers)
            if tensors.prototype.shape != tensors.key.shape:
                raise ValueError("its prototype and key differ in size")
            offsets, temperature = None, float(task.label_temperature)
            if task.label_offsets is not None or temperature != 1.0:
                if not task.labels:
                    raise ValueError("it has a label prior but no labels")
                # one finite number per label and a finite temperature > 0, or the record is refused
                space = AnswerSpace.of_labels(task.labels, task.label_offsets, temperature)
                offsets, temperature = space.offsets, space.temperature
        except (ValueError, TypeError) as exc:  # TypeError: a field of the wrong JSON type (null, a list)
            self._refuse(task.name, f"registry record {task.name!r} (change {change.seq}) is not servable: {exc}")
            return None
        self.refused.pop(task.name, None)
        labels = None if task.labels is None else self._labels.setdefault(tuple(task.labels), tuple(task.labels))
        return TaskEntry(
            name=task.name,
            source="adapted",
            vector=tensors.prototype,  # float16, as stored: half the memory of a million float32 prototypes
            key=tensors.key,
            adapters=tensors.adapters,
            template=task.template,
            labels=labels,
            examples=task.k,
            spread=Spread(*task.spread) if task.spread else None,
            created=_created(task.created),
            label_offsets=offsets,
            label_temperature=temperature,
        )

    def _refuse(self, name: str, error: str) -> None:
        self.refused[name] = error
        self.metrics.registry_errors.inc()
        log.error("registry record refused; the rest is served", extra={"task": name, "error": error})


@contextlib.contextmanager
def _no_collection(fresh: bool):
    """A fresh replica's catch-up without the cyclic garbage collector, whose scans of the growing heap (about
    ten objects a task, none in a cycle: refcounting frees them) cost a sixth of a million-task catch-up (38.6
    -> 32.0 s on the 2-core VM, docs/serving.md); after it, every object alive is frozen out of later
    collections, so a full collection while serving does not walk a million entries. The switch is
    process-wide, for the seconds the catch-up takes."""
    if not fresh or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.freeze()


def _release_memory() -> None:
    """Hand the catch-up's transient memory (a million parsed records) back to the OS (glibc; a no-op else)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _created(stamp: str) -> datetime:
    try:
        return datetime.fromisoformat(stamp)
    except (TypeError, ValueError):  # a record without a readable time: the time it is first served
        return datetime.now(timezone.utc)


async def follow_registry(sync: RegistrySync, redis_url: str, poll_seconds: float) -> None:
    """Apply the registry on every notice, and at least every `poll_seconds`; runs until cancelled."""
    client = connect_async(redis_url) if redis_url else None
    pubsub = None
    try:
        while True:
            try:
                if client is not None and pubsub is None:
                    pubsub = client.pubsub(ignore_subscribe_messages=True)
                    await pubsub.subscribe(REGISTRY_CHANNEL)
                if pubsub is not None:
                    await pubsub.get_message(timeout=poll_seconds)
                else:
                    await asyncio.sleep(poll_seconds)
            except (aioredis.RedisError, OSError) as exc:  # Redis down: keep polling the registry
                log.warning("registry notices unavailable; polling", extra={"error": str(exc)})
                pubsub = await _close(pubsub)
                await asyncio.sleep(poll_seconds)
            await asyncio.to_thread(sync.apply)
    finally:
        await _close(pubsub)
        if client is not None:
            await client.aclose()


async def _close(pubsub) -> None:
    if pubsub is not None:
        with contextlib.suppress(Exception):
            await pubsub.aclose()
    return None
