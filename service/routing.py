"""Nearest-prototype routing (paper Eq. 10) over one index per template: exact FAISS, or a native inverted file.

Cosine similarity is the inner product of L2-normalised float32 vectors. Tasks are grouped by the template their
inputs are written with (None: tasks without one), because an input is only ever routed among the tasks whose
template it fits (catalog.py): a query searches the groups it may go to and the best two are merged, so it
never pays for tasks it cannot reach.

A group of up to `flat_max` tasks is an exact FAISS IndexFlatIP. Above, an inverted file of k-means cells
(cell_index.CellIndex): a query reads its `nprobe` nearest cells on 16-number codes of the keys and re-scores
the best REFINE exactly, in one native call per batch that reads each probed cell once for all its queries.
Approximate, with recall@1 measured by bench/scale.py. Both keep the tasks' own int64 ids and are patched in
place (a removal is O(1)), so one change costs about the same at 10 tasks or a million. Neither is safe for a
search concurrent with a change: one lock covers both (searches run on one routing thread; a change holds the
lock for well under a millisecond).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np

from service.cell_index import REFINE, CellIndex

Group = str | None  # a template, or None for the tasks without one
FLAT_MAX = 20_000  # exact search up to here: ~2.6 MFLOP a query, about 1 ms on one core of this VM
NPROBE = 96  # IVF cells per query: at 1M keys on bench/scale.py's near-tie geometry 64 cells hold the best key
# for 0.985 of the queries, 80 for 0.994, 96 for 0.996 (the reduced scan makes the extra cells affordable)
REGROW = 4  # the cells are re-cut when a group has grown this many times past the size they were cut for


@dataclass(frozen=True)
class Route:
    """The best task for one input: its cosine `score`, and the `margin` to the runner-up (None if alone)."""

    task: str
    score: float
    margin: float | None


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
    norms = np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]
    return np.ascontiguousarray(v / np.maximum(norms, 1e-12), dtype=np.float32)


def cells_for(n: int) -> int:
    """IVF cells for n vectors: about sqrt(n) (so a cell holds about as many vectors as there are cells)."""
    return max(64, min(4096, int(math.sqrt(n))))


class _GroupIndex:
    """One group's keys: an exact FAISS IndexFlatIP while small, a CellIndex once over `flat_max`."""

    def __init__(self, dim: int, flat_max: int, nprobe: int, threads: int) -> None:
        self.dim, self.flat_max, self.nprobe, self.threads = dim, flat_max, nprobe, threads
        self.flat: faiss.IndexIDMap2 | None = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.cells: CellIndex | None = None
        self.trained_at = 0  # keys the cells were cut for; 0: flat

    def __len__(self) -> int:
        return len(self.cells) if self.cells is not None else self.flat.ntotal

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        n = len(self) + len(ids)
        if (self.cells is None and n > self.flat_max) or (self.cells is not None and n > REGROW * self.trained_at):
            if len(self):  # re-cut the cells for all of them, the new ones included
                old_vectors, old_ids = self._vectors()
                vectors, ids = np.concatenate([old_vectors, vectors]), np.concatenate([old_ids, ids])
            self.cells = CellIndex.build(vectors, ids, cells_for(len(ids)), self.nprobe, self.threads)
            self.flat, self.trained_at = None, len(ids)
        elif self.cells is not None:
            self.cells.add(vectors, ids)
        else:
            self.flat.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.cells is not None:
            self.cells.remove(ids)
        else:
            self.flat.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cells is not None:  # REFINE candidates, or more when more than a quarter of them are asked for
            return self.cells.search(queries, k, refine=max(REFINE, 4 * k))
        return self.flat.search(queries, min(k, self.flat.ntotal))

    def reconstruct(self, i: int) -> np.ndarray:
        return self.cells.reconstruct(i) if self.cells is not None else self.flat.reconstruct(i)

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        if self.cells is not None:
            return self.cells.vectors()
        ids = faiss.vector_to_array(self.flat.id_map).astype(np.int64)
        return self.flat.index.reconstruct_n(0, len(ids)), ids


class PrototypeIndex:
    """Task routing keys searchable by cosine, grouped by template; thread-safe, patched in place."""

    def __init__(self, dim: int, *, flat_max: int = FLAT_MAX, nprobe: int = NPROBE, ivf_threads: int = 1) -> None:
        self.dim, self.flat_max, self.nprobe, self.ivf_threads = dim, flat_max, nprobe, ivf_threads
        self._lock = threading.Lock()
        self._groups: dict[Group, _GroupIndex] = {}
        self._ids: dict[str, int] = {}  # task -> its faiss id
        self._names: list[str | None] = []  # faiss id -> task (None: removed); ids are never reused, so a stale
        self._group_of: list[Group] = []  # id can never name another task. faiss id -> its group

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, task: str) -> bool:
        return task in self._ids

    def id_of(self, task: str) -> int:
        return self._ids[task]

    def size(self, groups: Iterable[Group] | None = None) -> int:
        """Tasks in `groups` (all when None): how many candidates a query among them has."""
        if groups is None:
            return len(self._ids)
        return sum(len(self._groups[g]) for g in groups if g in self._groups)

    def replace_all(self, keys: Iterable[tuple[str, np.ndarray, Group]]) -> None:
        """Set the whole table at once (start-up)."""
        with self._lock:
            self._groups, self._ids, self._names, self._group_of = {}, {}, [], []
        self.upsert_many(keys)

    def upsert(self, task: str, vector: np.ndarray, group: Group = None) -> None:
        self.upsert_many([(task, vector, group)])

    def upsert_many(self, keys: Iterable[tuple[str, np.ndarray, Group]]) -> None:
        """Add or move tasks; every vector is checked before anything changes (ValueError names the task).

        Per-key work stays in bulk numpy where it can: a fresh replica passes a million keys at once."""
        keys = list({task: (task, vector, group) for task, vector, group in keys}.values())  # a name twice: last
        if not keys:
            return
        tasks, vectors, groups = (list(part) for part in zip(*keys, strict=True))
        self.add_columns(tasks, self._stacked(tasks, vectors), groups)

    def add_columns(self, tasks: list[str], vectors: np.ndarray, groups: list[Group]) -> None:
        """`upsert_many` for keys already stacked [N, dim] (row i is task i's; each task once): a replica
        catching up stacks a million keys once, not once per layer."""
        vectors = self._checked(tasks, vectors)
        with self._lock:
            self._remove_locked([task for task in tasks if task in self._ids])
            start = len(self._names)
            self._ids.update(zip(tasks, range(start, start + len(tasks)), strict=True))
            self._names.extend(tasks)
            self._group_of.extend(groups)
            ids = np.arange(start, start + len(tasks), dtype=np.int64)
            for group, rows in self._rows_by_group(groups).items():
                target = self._groups.get(group)
                if target is None:
                    target = self._groups[group] = _GroupIndex(self.dim, self.flat_max, self.nprobe, self.ivf_threads)
                target.add(vectors if rows is None else vectors[rows], ids if rows is None else ids[rows])

    def _stacked(self, tasks: list[str], vectors: list[np.ndarray]) -> np.ndarray:
        """[N, dim] of the keys, or ValueError naming the first task whose key has another size."""
        try:
            stacked = np.stack(vectors)
        except ValueError:  # of different sizes: found below
            stacked = None
        if stacked is not None and stacked.ndim == 2 and stacked.shape[1] == self.dim:
            return stacked
        if stacked is not None and stacked.ndim > 2 and np.prod(stacked.shape[1:]) == self.dim:
            return stacked.reshape(len(tasks), self.dim)
        for task, vector in zip(tasks, vectors, strict=True):
            if np.size(vector) != self.dim:
                raise ValueError(f"prototype of {task!r} has {np.size(vector)} dims; the index holds {self.dim}-dim")
        return np.stack([np.asarray(v).reshape(-1) for v in vectors])

    @staticmethod
    def _rows_by_group(groups: list[Group]) -> dict[Group, np.ndarray | None]:
        """The rows of each group; None for all of them (the common case: one template, or none, for all)."""
        if all(g == groups[0] for g in groups):
            return {groups[0]: None}
        rows: dict[Group, list[int]] = {}
        for row, group in enumerate(groups):
            rows.setdefault(group, []).append(row)
        return {group: np.asarray(where) for group, where in rows.items()}

    def remove(self, task: str) -> bool:
        with self._lock:
            if task not in self._ids:
                return False
            self._remove_locked([task])
            return True

    def _remove_locked(self, tasks: list[str]) -> None:
        by_group: dict[Group, list[int]] = {}
        for task in tasks:
            i = self._ids.pop(task)
            self._names[i] = None
            by_group.setdefault(self._group_of[i], []).append(i)
        for group, ids in by_group.items():
            self._groups[group].remove(np.asarray(ids, dtype=np.int64))
            if not len(self._groups[group]):
                del self._groups[group]

    def search(self, queries: np.ndarray, groups: Iterable[Group] | None = None) -> list[Route]:
        """The best task for each row of `queries` [B, dim], among the tasks of `groups` (every task when None);
        LookupError when there is none."""
        q = normalise(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have {q.shape[1]} dims, the index {self.dim}")
        with self._lock:
            wanted = list(self._groups) if groups is None else [g for g in dict.fromkeys(groups) if g in self._groups]
            if not wanted:
                raise LookupError("no task to route to: the index holds none of the candidate tasks")
            found = [self._groups[g].search(q, 2) for g in wanted]
            scores = np.concatenate([s for s, _ in found], axis=1)
            ids = np.concatenate([i for _, i in found], axis=1)
            names = self._names
            order = np.argsort(-scores, axis=1, kind="stable")
            return [self._route(s[o], i[o], names) for s, i, o in zip(scores, ids, order, strict=True)]

    def nearest_keys(self, query: np.ndarray, k: int, exclude: str | None = None) -> np.ndarray:
        """The (unit) keys of the up to `k` tasks nearest `query` [dim], across groups, `exclude` left out."""
        q = normalise(query)
        with self._lock:
            found = []
            for group in self._groups.values():
                scores, ids = group.search(q, k + 1)
                found += [(float(s), group, int(i)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
            found.sort(key=lambda hit: -hit[0])
            keep = [(g, i) for _, g, i in found if self._names[i] != exclude][:k]
            keys = [g.reconstruct(i) for g, i in keep]
        return np.stack(keys) if keys else np.zeros((0, self.dim), np.float32)

    @staticmethod
    def _route(scores: np.ndarray, ids: np.ndarray, names: list[str | None]) -> Route:
        valid = ids >= 0  # an IVF can return fewer than k hits (-1 ids) when its probed cells hold fewer
        scores, ids = scores[valid], ids[valid]
        if not len(ids):
            raise LookupError("no task to route to: the probed cells were empty")
        margin = float(scores[0] - scores[1]) if len(ids) > 1 else None
        return Route(task=names[int(ids[0])], score=float(scores[0]), margin=margin)

    def valid(self, vectors: np.ndarray) -> np.ndarray:
        """Which rows of `vectors` [N, dim] can be routing keys: finite and not all zero."""
        v = np.asarray(vectors)
        if not np.issubdtype(v.dtype, np.floating):
            v = v.astype(np.float32)  # (float16 keys are checked as they are: no float32 copy of a million)
        return np.all(np.isfinite(v), axis=1) & np.any(v != 0, axis=1)

    def _checked(self, tasks: list[str], vectors: np.ndarray) -> np.ndarray:
        """Unit float32 rows (a new array), or ValueError naming the first task whose vector cannot be a key."""
        v = np.array(vectors, dtype=np.float32, order="C")  # a copy of our own, normalised in place: at a
        bad = np.flatnonzero(~self.valid(v))  # million keys each fresh 512 MB array costs ~1 s of page faults
        if len(bad):
            raise ValueError(f"prototype of {tasks[bad[0]]!r} must be finite and non-zero")
        v /= np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]
        return v
