"""The native cell-major IVF search (service/_cellscan.c through service/cell_index.py) against a numpy reference
of the same rule: per query, its nprobe nearest cells; in them the best `refine` keys by code score; of those the
best k by the float16 key's exact score."""

import os
import subprocess
import sys

import numpy as np
import pytest

from service import _cellscan
from service.cell_index import LANES, SLACK, CellIndex
from service.routing import normalise


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim)).astype(np.float32)
    return normalise(centres[rng.integers(0, 12, n)] + 0.4 * rng.standard_normal((n, dim)).astype(np.float32))


def reference(index: CellIndex, queries: np.ndarray, k: int, refine: int) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = [], []
    for q in queries:
        cells = np.argsort(-(index.centroids @ q), kind="stable")[: index.nprobe]
        live = [(c, int(index.sizes[c])) for c in cells]
        codes = np.concatenate([index.codes[c].transpose(0, 2, 1).reshape(-1, index.rdim)[:n] for c, n in live])
        keys = np.concatenate([index.keys[c][:n] for c, n in live]).astype(np.float32)
        key_ids = np.concatenate([index.ids[c][:n] for c, n in live])
        best_codes = np.argsort(-(codes.astype(np.float32) @ (q @ index.projection)), kind="stable")[:refine]
        exact = keys[best_codes] @ q
        order = np.lexsort((key_ids[best_codes], -exact))[:k]  # best first, ties by the lower id
        scores.append(exact[order])
        ids.append(key_ids[best_codes][order])
    return np.stack(scores), np.stack(ids)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 37])
def test_search_follows_the_rule_at_any_batch_and_thread_count(batch, threads):
    keys = clustered(6000, 24, seed=0)
    index = CellIndex.build(keys, np.arange(6000) * 5 + 3, nlist=40, nprobe=6, threads=threads)
    assert index.rdim == 16 < index.dim  # codes are a projection: the refine step matters
    queries = clustered(batch, 24, seed=1)
    scores, ids = index.search(queries, 3, refine=20)
    want_scores, want_ids = reference(index, queries, 3, 20)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert all(len(set(row)) == 3 for row in ids)  # a key is never returned twice


def test_full_rank_codes_with_every_cell_probed_give_exact_search():
    keys = clustered(3000, 16, seed=2)
    index = CellIndex.build(keys, np.arange(3000), nlist=20, nprobe=20, threads=2)
    queries = clustered(50, 16, seed=3)
    _, ids = index.search(queries, 1, refine=8)
    stored = np.concatenate([index.keys[c][: index.sizes[c]] for c in range(20)]).astype(np.float32)
    stored_ids = np.concatenate([index.ids[c][: index.sizes[c]] for c in range(20)])
    np.testing.assert_array_equal(ids[:, 0], stored_ids[np.argmax(queries @ stored.T, axis=1)])


def test_changes_are_patched_in_place_and_search_sees_them():
    keys = clustered(4000, 24, seed=4)
    index = CellIndex.build(keys, np.arange(4000), nlist=30, nprobe=5, threads=1)
    gone = np.arange(0, 4000, 3)
    index.remove(gone)
    index.remove(np.array([gone[0], 10**6]))  # absent ids are skipped
    index.add(np.zeros((0, 24), np.float32), np.zeros(0, np.int64))  # nothing to add: nothing changes
    fresh = clustered(500, 24, seed=5)
    index.add(fresh, np.arange(4000, 4500))
    assert len(index) == 4000 - len(gone) + 500
    live, live_ids = index.vectors()
    assert set(live_ids.tolist()) == (set(range(4500)) - set(gone.tolist()))
    np.testing.assert_array_equal(index.reconstruct(4001), fresh[1].astype(np.float16).astype(np.float32))
    with pytest.raises(KeyError):
        index.reconstruct(int(gone[1]))
    queries = clustered(25, 24, seed=6)
    scores, ids = index.search(queries, 2)
    want_scores, want_ids = reference(index, queries, 2, 128)
    np.testing.assert_array_equal(ids, want_ids)
    assert not set(ids.ravel().tolist()) & set(gone.tolist())


def test_fewer_keys_than_asked_pad_with_minus_one():
    keys = clustered(40, 24, seed=7)
    index = CellIndex.build(keys, np.arange(40), nlist=8, nprobe=1, threads=1)
    scores, ids = index.search(clustered(3, 24, seed=8), 30)
    assert ids.shape == (3, 30) and (ids == -1).any()
    assert np.all(np.isneginf(scores[ids == -1])) and np.all(np.isfinite(scores[ids >= 0]))


def test_buffers_that_do_not_match_the_sizes_are_refused_by_name():
    keys = clustered(500, 24, seed=9)
    index = CellIndex.build(keys, np.arange(500), nlist=4, nprobe=4, threads=1)
    out_s, out_i = np.empty((1, 1), np.float32), np.empty((1, 1), np.int64)
    query = clustered(1, 24, seed=10)

    def call(codes=None, sizes=None, projection=None, refine=8):
        _cellscan.search(
            codes or index.codes, index.ids, index.keys, index.sizes if sizes is None else sizes,
            index.centroids, index.projection if projection is None else projection, query, out_s, out_i,
            index.rdim, index.dim, index.nprobe, refine, 1, 1,
        )  # fmt: skip

    call()  # as built: fine
    short = list(index.codes)
    short[2] = short[2][:1]
    with pytest.raises(ValueError, match="codes of cell 2"):
        call(codes=short)
    with pytest.raises(ValueError, match="codes of cell 0"):
        call(codes=[c.astype(np.float32) for c in index.codes])  # float32 where float16 belongs
    with pytest.raises(ValueError, match="sizes"):
        call(sizes=index.sizes[:2])
    with pytest.raises(ValueError, match="has size"):
        call(sizes=np.array([-1, 0, 0, 0], np.int64))
    with pytest.raises(ValueError, match="projection"):
        call(projection=index.projection[:3])
    with pytest.raises(ValueError, match="refine"):
        call(refine=0)


def test_cells_grow_by_blocks_of_lanes():
    keys = clustered(100, 24, seed=11)
    index = CellIndex.build(keys, np.arange(100), nlist=2, nprobe=2, threads=1)
    for c in range(2):
        assert len(index.ids[c]) % LANES == 0 and index.codes[c].shape[0] * LANES == len(index.ids[c])


def test_the_first_fill_shares_one_slab_and_a_cell_that_outgrows_its_room_moves_out():
    """Huge pages for the scan: the first fill puts every cell in one array per part, with SLACK room; a cell
    that outgrows it gets arrays of its own and search still follows the rule."""
    keys = clustered(2000, 24, seed=12)
    index = CellIndex.build(keys, np.arange(2000), nlist=10, nprobe=10, threads=1)
    slab = index.keys[0].base
    assert slab is not None and all(k.base is slab for k in index.keys)
    assert all(len(index.ids[c]) >= SLACK * index.sizes[c] for c in range(10))
    size, room = int(index.sizes[3]), len(index.ids[3]) - int(index.sizes[3])
    near = normalise(index.centroids[3] + 1e-3 * np.random.default_rng(13).standard_normal((room + 5, 24)))
    index.add(near, np.arange(2000, 2000 + room + 5))
    assert index.sizes[3] == size + room + 5 and index.keys[3].base is not slab
    assert all(index.keys[c].base is slab for c in range(10) if c != 3)
    queries = clustered(20, 24, seed=14)
    np.testing.assert_array_equal(index.search(queries, 3)[1], reference(index, queries, 3, 128)[1])


def test_the_plain_c_path_gives_what_the_vector_path_gives(tmp_path):
    """PHA_CELLSCAN_PORTABLE=1 picks the plain-C kernels (what a CPU without AVX2/FMA/F16C runs); a fresh
    process of each reads the same index from disk and searches the same queries."""
    keys = clustered(5000, 24, seed=12)
    index = CellIndex.build(keys, np.arange(5000), nlist=30, nprobe=7, threads=2)
    np.savez(tmp_path / "index.npz", queries=clustered(40, 24, seed=13), keys=keys, centroids=index.centroids,
             projection=index.projection)  # fmt: skip
    script = (
        "import sys, numpy as np\n"
        "from service.cell_index import CellIndex\n"
        f"d = np.load({str(tmp_path / 'index.npz')!r})\n"
        "index = CellIndex(d['centroids'], d['projection'], nprobe=7, threads=2)\n"
        "index.add(d['keys'], np.arange(len(d['keys'])))\n"
        "s, i = index.search(d['queries'], 4, refine=24)\n"
        "np.savez(sys.argv[1], s=s, i=i)\n"
    )
    results = {}
    for portable in ("0", "1"):
        out = tmp_path / f"out{portable}.npz"
        env = {**os.environ, "PHA_CELLSCAN_PORTABLE": portable}
        subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=True, timeout=120)
        results[portable] = np.load(out)
    np.testing.assert_array_equal(results["0"]["i"], results["1"]["i"])
    np.testing.assert_allclose(results["0"]["s"], results["1"]["s"], rtol=1e-5, atol=1e-6)
