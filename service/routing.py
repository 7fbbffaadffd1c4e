"""Nearest-prototype routing (paper Eq. 10) over a FAISS index.

Cosine similarity is the inner product of L2-normalised float32 vectors (IndexFlatIP), and IndexIDMap2 gives
every task a stable int64 id that survives other tasks coming and going.

FAISS CPU indexes are safe for concurrent searches but not for a search concurrent with a change, so an index is
never changed once published: an update builds a new index from the vectors and swaps one reference. A search
reads that reference once and works on a consistent snapshot; updates are serialised by a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class Route:
    """The best task for one input: its cosine `score`, and the `margin` to the runner-up (None if alone)."""

    task: str
    score: float
    margin: float | None


@dataclass(frozen=True)
class _Snapshot:
    index: faiss.IndexIDMap2
    names: Mapping[int, str]  # faiss id -> task name


def search_thread(threads: int) -> ThreadPoolExecutor:
    """One thread for FAISS searches, running with `threads` OpenMP threads.

    OpenMP's thread count is a per-thread setting, and FAISS shares it with torch (one libgomp): setting it on
    the model thread would slow torch down, and leaving FAISS at OpenMP's default costs milliseconds per search
    on a busy CPU (measured on 2 shared cores: 8 ms for 10 prototypes, 0.01 ms with one thread). So searches get
    a thread of their own, configured once.
    """
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="pha-route", initializer=faiss.omp_set_num_threads, initargs=(threads,)
    )


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32 C-contiguous (what FAISS wants); zero rows stay zero."""
    v = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if v.ndim == 1:
        v = v.reshape(1, -1)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.ascontiguousarray(v / np.maximum(norms, 1e-12), dtype=np.float32)


class PrototypeIndex:
    """Task prototypes searchable by cosine; thread-safe searches, copy-on-write updates."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._lock = threading.Lock()
        self._vectors: dict[str, np.ndarray] = {}  # task -> unit vector; the source the index is built from
        self._ids: dict[str, int] = {}  # task -> stable faiss id (never reused)
        self._next_id = 0
        self._snapshot = self._build()

    def __len__(self) -> int:
        return self._snapshot.index.ntotal

    def __contains__(self, task: str) -> bool:
        return task in self._vectors

    def id_of(self, task: str) -> int:
        return self._ids[task]

    def replace_all(self, prototypes: Mapping[str, np.ndarray]) -> None:
        """Set the whole table at once (start-up, or a registry reload); ids of kept tasks are kept."""
        with self._lock:
            self._vectors = {name: self._checked(name, v) for name, v in prototypes.items()}
            self._publish()

    def upsert(self, task: str, vector: np.ndarray) -> None:
        with self._lock:
            self._vectors = {**self._vectors, task: self._checked(task, vector)}  # copy-on-write: see search_among
            self._publish()

    def remove(self, task: str) -> bool:
        with self._lock:
            if task not in self._vectors:
                return False
            self._vectors = {name: v for name, v in self._vectors.items() if name != task}
            self._publish()
            return True

    def search(self, queries: np.ndarray) -> list[Route]:
        """The best task for each row of `queries` [B, dim]; raises LookupError when the index is empty."""
        snap = self._snapshot  # one read: the whole search sees one consistent index
        if snap.index.ntotal == 0:
            raise LookupError("the prototype index is empty: no task to route to")
        q = normalise(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have {q.shape[1]} dims, the index {self.dim}")
        k = min(2, snap.index.ntotal)
        scores, ids = snap.index.search(q, k)
        return [self._route(snap, s, i) for s, i in zip(scores, ids, strict=True)]

    def search_among(self, queries: np.ndarray, tasks: tuple[str, ...]) -> list[Route]:
        """The best of `tasks` for each row of `queries` (exact cosine over those tasks' keys; structured inputs
        narrow routing to the tasks whose templates take their fields). Unknown names are skipped."""
        vectors = self._vectors  # replaced whole on every change, never mutated: one consistent read
        names = [t for t in tasks if t in vectors]
        if not names:
            raise LookupError(f"none of the tasks {list(tasks)[:5]} is in the index")
        keys = np.stack([vectors[t] for t in names])
        scores = normalise(queries) @ keys.T
        order = np.argsort(-scores, axis=1)[:, :2]
        return [
            Route(
                task=names[row[0]],
                score=float(s[row[0]]),
                margin=float(s[row[0]] - s[row[1]]) if len(row) > 1 else None,
            )
            for s, row in zip(scores, order, strict=True)
        ]

    @staticmethod
    def _route(snap: _Snapshot, scores: np.ndarray, ids: np.ndarray) -> Route:
        margin = float(scores[0] - scores[1]) if len(ids) > 1 and ids[1] >= 0 else None
        return Route(task=snap.names[int(ids[0])], score=float(scores[0]), margin=margin)

    def _checked(self, task: str, vector: np.ndarray) -> np.ndarray:
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise ValueError(f"prototype of {task!r} has {v.shape[0]} dims; the index holds {self.dim}-dim vectors")
        if not np.all(np.isfinite(v)) or not np.any(v):
            raise ValueError(f"prototype of {task!r} must be finite and non-zero")
        return normalise(v)[0]

    def _publish(self) -> None:
        """Build a new index from `_vectors` and swap it in (caller holds the lock)."""
        for name in self._vectors:
            if name not in self._ids:
                self._ids[name] = self._next_id
                self._next_id += 1
        self._snapshot = self._build()

    def _build(self) -> _Snapshot:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        names = {self._ids[name]: name for name in self._vectors}
        if names:
            ids = np.fromiter(names, dtype=np.int64, count=len(names))
            index.add_with_ids(np.stack([self._vectors[names[i]] for i in ids]), ids)
        return _Snapshot(index=index, names=names)
