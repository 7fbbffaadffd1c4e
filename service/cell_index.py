"""An inverted file (IVF) for routing among many tasks, held in numpy and searched by a native cell-major scan.

The keys are cut into k-means cells (FAISS's clustering, inner product); a query reads the `nprobe` cells whose
centroids are nearest it. Per cell, three parallel arrays keep its keys by slot:
- `codes`: each key projected on the keys' top `rdim` directions (`top_directions`), float16 (32 bytes a key:
  a batch of 32 at 1M keys reads ~23 MB of them), in blocks of LANES keys laid out [block, rdim, lane] so the
  scan scores 16 keys with rdim vector multiply-adds;
- `keys`: the unit keys themselves in float16 (the registry's own precision), re-scored exactly;
- `ids`: the tasks' int64 ids.
`where[id]` is the key's cell and slot, so a removal (the cell's last key moves into the hole) and a
reconstruction are O(1) at any size. Capacity grows by GROWTH per cell, so an addition is amortised O(1).

A search (service/_cellscan.c) reads every cell the batch probes once, for all the queries that probe it: a
batch of 32 real inputs probes ~730 of 1,000 cells at 1M keys, so per-query scans (what FAISS offers) read the
same codes ~4 times over. Each query's best REFINE codes are re-scored on the float16 keys in the same call.
"""

from __future__ import annotations

import faiss
import numpy as np

from service import _cellscan

LANES = _cellscan.LANES  # keys per code block: their 16 float32 scores fill two AVX2 registers
GROWTH = 1.5  # a full cell's arrays grow by half: amortised O(1) additions, at most a third of a cell unused
# The first fill lays every cell out in one array per part (a slab), each cell with a quarter more room than it
# needs: arrays of megabytes get transparent huge pages (numpy asks for them from 4 MB up), where a thousand
# cells of their own sit on 4 KB pages and a batch's scan misses the TLB on nearly every cell it reads (1M keys,
# 155 batches of 32, four passes each: p50 4.6-5.8 -> 3.6-3.9 ms, p99 6.8-19.7 -> 4.8-9.4 ms). A cell that
# outgrows its room moves to arrays of its own, as every cell did before; its old room stays unused.
SLACK = 1.25
TRAIN_POINTS_PER_CELL = 40  # k-means sample per cell: enough for stable cells, and training stays in seconds
# Directions of the scan codes. Queries (retrieval vectors z) and keys live near a few task clusters, so the top
# directions of the keys' second moment carry nearly all of a query's energy (98% in 8 of 128 on the demo's z),
# and the code's inner product ranks the near-ties of a cell in nearly the exact order. Uncentred on purpose:
# q.P.P'.k is the part of q.k in those directions; a centred projection adds a key-dependent term that re-orders.
REDUCED_DIMS = 16
# Candidates re-scored exactly per query: with 16-dim codes the probed cells' best key is among the codes' top
# 128 nearly always (bench/scale.py at 1M, 96 cells: recall@1 0.994; 32 re-scored: 0.988); each costs one
# float16 key read in place and 128 multiply-adds.
REFINE = 128


def top_directions(vectors: np.ndarray, n: int) -> np.ndarray:
    """[dim, n]: the n top eigenvectors of the vectors' (uncentred) second moment, as columns."""
    moment = vectors.T.astype(np.float64) @ vectors.astype(np.float64) / max(len(vectors), 1)
    _, vecs = np.linalg.eigh(moment)  # ascending eigenvalues
    return np.ascontiguousarray(vecs[:, ::-1][:, :n], dtype=np.float32)


class CellIndex:
    """Unit keys with int64 ids, in cells; `search` gives each query's best k (cosine, id), best first."""

    def __init__(self, centroids: np.ndarray, projection: np.ndarray, nprobe: int, threads: int) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)  # [nlist, dim]
        self.projection = np.ascontiguousarray(projection, dtype=np.float32)  # [dim, rdim]
        self.dim, self.rdim = self.projection.shape
        self.nprobe, self.threads = min(nprobe, len(centroids)), threads
        nlist = len(centroids)
        self.codes = [np.zeros((0, self.rdim, LANES), np.float16) for _ in range(nlist)]
        self.keys = [np.zeros((0, self.dim), np.float16) for _ in range(nlist)]
        self.ids = [np.zeros(0, np.int64) for _ in range(nlist)]
        self.sizes = np.zeros(nlist, np.int64)
        self.where = np.full(0, -1, np.int64)  # id -> cell << 32 | slot; -1: not here
        self.assigner = faiss.IndexFlatIP(self.dim)  # nearest centroid of each new key
        self.assigner.add(self.centroids)
        self.ntotal = 0

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, nlist: int, nprobe: int, threads: int) -> CellIndex:
        """Cells cut by k-means on a sample of `vectors` (unit rows), then every vector added."""
        dim = vectors.shape[1]
        sample = vectors[np.sort(np.random.default_rng(0).permutation(len(ids))[: nlist * TRAIN_POINTS_PER_CELL])]
        params = faiss.ClusteringParameters()
        params.max_points_per_centroid = TRAIN_POINTS_PER_CELL
        params.spherical = True  # unit centroids: a cell is chosen by cosine, as FAISS's IVF does for inner products
        clustering = faiss.Clustering(dim, nlist, params)
        clustering.train(np.ascontiguousarray(sample, dtype=np.float32), faiss.IndexFlatIP(dim))
        centroids = faiss.vector_to_array(clustering.centroids).reshape(nlist, dim)
        index = cls(centroids, top_directions(sample, min(REDUCED_DIMS, dim)), nprobe, threads)
        index.add(vectors, ids)
        return index

    def __len__(self) -> int:
        return self.ntotal

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Unit float32 rows with ids not in the index yet."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        _, cells = self.assigner.search(vectors, 1)
        cells = cells[:, 0]
        if not self.ntotal and not any(len(i) for i in self.ids):
            self._lay_out(np.bincount(cells, minlength=len(self.centroids)))
        if ids.max() >= len(self.where):
            grown = np.full(max(int(ids.max()) + 1, int(len(self.where) * GROWTH)), -1, np.int64)
            grown[: len(self.where)] = self.where
            self.where = grown
        codes = vectors @ self.projection
        order = np.argsort(cells, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(cells[order]) != 0, True])
        for lo, hi in zip(starts[:-1], starts[1:], strict=True):  # float16 on the way into each cell: no
            rows = order[lo:hi]  # full-size temporary (at 1M keys each costs ~1 s of page faults on a VM)
            self._append(int(cells[rows[0]]), codes[rows], vectors[rows], ids[rows])
        self.ntotal += len(ids)

    def _append(self, cell: int, codes: np.ndarray, keys: np.ndarray, ids: np.ndarray) -> None:
        size, need = int(self.sizes[cell]), int(self.sizes[cell]) + len(ids)
        if need > len(self.ids[cell]):
            capacity = -(-max(need, int(len(self.ids[cell]) * GROWTH)) // LANES) * LANES
            self._reserve(cell, capacity)
        slots = np.arange(size, need)
        self.codes[cell][slots // LANES, :, slots % LANES] = codes
        self.keys[cell][size:need] = keys
        self.ids[cell][size:need] = ids
        self.where[ids] = (cell << 32) | slots
        self.sizes[cell] = need

    def _lay_out(self, counts: np.ndarray) -> None:
        """Room for `counts` keys per cell (and SLACK more) in one slab per part; each cell gets views of it."""
        capacity = -(-np.ceil(counts * SLACK).astype(np.int64) // LANES) * LANES
        ends = np.cumsum(capacity)
        total = int(ends[-1]) if len(ends) else 0
        codes = np.zeros((total // LANES, self.rdim, LANES), np.float16)
        keys = np.zeros((total, self.dim), np.float16)
        ids = np.full(total, -1, np.int64)
        for cell, (end, room) in enumerate(zip(ends.tolist(), capacity.tolist(), strict=True)):
            start = end - room
            self.codes[cell] = codes[start // LANES : end // LANES]
            self.keys[cell], self.ids[cell] = keys[start:end], ids[start:end]

    def _reserve(self, cell: int, capacity: int) -> None:
        size = int(self.sizes[cell])
        codes = np.zeros((capacity // LANES, self.rdim, LANES), np.float16)
        codes[: len(self.codes[cell])] = self.codes[cell]
        keys = np.zeros((capacity, self.dim), np.float16)
        keys[:size] = self.keys[cell][:size]
        ids = np.full(capacity, -1, np.int64)
        ids[:size] = self.ids[cell][:size]
        self.codes[cell], self.keys[cell], self.ids[cell] = codes, keys, ids

    def remove(self, ids: np.ndarray) -> None:
        """Ids not in the index are skipped."""
        for i in np.asarray(ids, dtype=np.int64):
            loc = int(self.where[i]) if 0 <= i < len(self.where) else -1
            if loc < 0:
                continue
            cell, slot = loc >> 32, loc & 0xFFFFFFFF
            last = int(self.sizes[cell]) - 1
            if slot != last:  # the cell's last key moves into the hole
                moved = int(self.ids[cell][last])
                self.codes[cell][slot // LANES, :, slot % LANES] = self.codes[cell][last // LANES, :, last % LANES]
                self.keys[cell][slot] = self.keys[cell][last]
                self.ids[cell][slot] = moved
                self.where[moved] = (cell << 32) | slot
            self.codes[cell][last // LANES, :, last % LANES] = 0
            self.ids[cell][last] = -1
            self.sizes[cell] = last
            self.where[i] = -1
            self.ntotal -= 1

    def search(self, queries: np.ndarray, k: int, refine: int = REFINE) -> tuple[np.ndarray, np.ndarray]:
        """[B, k] cosines and ids of each (unit) query's best k keys among its probed cells, best first; where the
        cells hold fewer than k keys, the rest are -inf and -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.ntotal))
        out_scores = np.empty((len(queries), k), np.float32)
        out_ids = np.empty((len(queries), k), np.int64)
        _cellscan.search(
            self.codes, self.ids, self.keys, self.sizes, self.centroids, self.projection, queries, out_scores, out_ids,
            self.rdim, self.dim, self.nprobe, max(refine, k), k, self.threads,
        )  # fmt: skip
        return out_scores, out_ids

    def reconstruct(self, i: int) -> np.ndarray:
        loc = int(self.where[i]) if 0 <= i < len(self.where) else -1
        if loc < 0:
            raise KeyError(f"id {i} is not in the index")
        return self.keys[loc >> 32][loc & 0xFFFFFFFF].astype(np.float32)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every key (float32) and its id, cell by cell."""
        keys = [self.keys[c][:n] for c, n in enumerate(self.sizes) if n]
        ids = [self.ids[c][:n] for c, n in enumerate(self.sizes) if n]
        if not keys:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        return np.concatenate(keys).astype(np.float32), np.concatenate(ids)
