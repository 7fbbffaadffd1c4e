"""FAISS prototype routing and the task catalogue hook, alone and through the HTTP app."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from service.catalog import TaskCatalog, TaskEntry
from service.routing import PrototypeIndex
from tests.support.app import running_app

DIM = 8


def unit(i: int, dim: int = DIM) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[i] = 1.0
    return v


def keys(table: dict[str, np.ndarray], group: str | None = None) -> list[tuple[str, np.ndarray, str | None]]:
    return [(name, vector, group) for name, vector in table.items()]


def test_search_returns_best_task_score_and_margin():
    index = PrototypeIndex(DIM)
    index.replace_all(keys({"a": unit(0), "b": unit(1), "c": unit(0) + unit(1)}))
    query = np.stack([unit(0) * 5, unit(1) + 0.1 * unit(0)])  # scale must not matter (cosine)
    first, second = index.search(query)
    assert first.task == "a" and first.score == pytest.approx(1.0)
    assert first.margin == pytest.approx(1.0 - np.sqrt(0.5), abs=1e-5)
    assert second.task == "b" and 0 < second.margin < 0.5


def test_single_prototype_has_no_margin_and_empty_index_refuses():
    index = PrototypeIndex(DIM)
    with pytest.raises(LookupError):
        index.search(unit(0))
    index.upsert("only", unit(3))
    (route,) = index.search(unit(3))
    assert route.task == "only" and route.margin is None


def test_search_only_among_the_groups_asked_for_and_merges_across_them():
    index = PrototypeIndex(DIM)
    index.upsert_many([("a", unit(0), "t1"), ("b", unit(1), "t2"), ("c", unit(0) + 0.2 * unit(1), None)])
    assert index.search(unit(0), ["t2"])[0].task == "b"
    best = index.search(unit(0), ["t2", None])[0]
    assert best.task == "c" and best.margin > 0  # the runner-up (b) comes from the other group
    assert index.search(unit(0))[0].task == "a" and index.size(["t1", None]) == 2
    with pytest.raises(LookupError):
        index.search(unit(0), ["unknown"])
    index.upsert("a", unit(2), "t2")  # a task moving to another template leaves its old group
    assert index.size(["t1"]) == 0 and index.search(unit(2), ["t2"])[0].task == "a"


def test_ids_are_never_reused():
    index = PrototypeIndex(DIM)
    index.replace_all(keys({"a": unit(0), "b": unit(1)}))
    seen = {index.id_of("a"), index.id_of("b")}
    assert index.remove("a") is True and index.remove("a") is False
    index.upsert("b", unit(4))  # a new key: a new id, so nothing cached under the old one can answer for it
    index.upsert("a", unit(0))
    assert {index.id_of("a"), index.id_of("b")}.isdisjoint(seen)
    assert len(index) == 2 and index.search(unit(4))[0].task == "b"


def test_invalid_prototypes_change_nothing():
    index = PrototypeIndex(DIM)
    index.upsert("a", unit(0))
    for bad in (np.ones(DIM + 1), np.zeros(DIM), np.full(DIM, np.nan)):
        with pytest.raises(ValueError):
            index.upsert_many([("ok", unit(1), None), ("b", bad, None)])
    assert len(index) == 1 and "b" not in index and "ok" not in index


def test_a_large_group_turns_approximate_and_keeps_recall_through_changes():
    """Past flat_max a group becomes an IVF; removals and moves are patched in place, and the nearest task
    is still found for nearly every query (exact search is the reference)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 32)).astype(np.float32)
    vectors = centres[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 32)).astype(np.float32)
    index = PrototypeIndex(32, flat_max=500, nprobe=8)
    index.upsert_many((f"t{i}", v, None) for i, v in enumerate(vectors))
    assert index._groups[None].trained_at > 0, "the group did not turn into an IVF"
    for i in range(0, 3000, 7):  # a seventh removed, another seventh moved
        index.remove(f"t{i}")
    moved = {f"t{i}": rng.standard_normal(32).astype(np.float32) for i in range(3, 3000, 7)}
    index.upsert_many((n, v, None) for n, v in moved.items())
    table = {f"t{i}": v for i, v in enumerate(vectors) if i % 7}
    table.update(moved)
    names = list(table)
    unit_table = np.stack([table[n] / np.linalg.norm(table[n]) for n in names])
    queries = vectors[rng.integers(0, 3000, 300)] + 0.1 * rng.standard_normal((300, 32)).astype(np.float32)
    exact = [names[i] for i in np.argmax(queries @ unit_table.T, axis=1)]
    found = [r.task for r in index.search(queries)]
    recall = np.mean([a == b for a, b in zip(found, exact, strict=True)])
    assert len(index) == len(table) and recall >= 0.95, recall


def test_concurrent_searches_during_updates():
    index = PrototypeIndex(DIM)
    index.replace_all(keys({f"t{i}": unit(i) for i in range(4)}))
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        queries = np.eye(DIM, dtype=np.float32)[:4]
        while not stop.is_set():
            try:
                routes = index.search(queries)
                assert all(r.task.startswith("t") for r in routes)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(300):
        index.upsert(f"t{4 + i % 4}", unit(4 + i % 4) + 0.01 * i)
        index.remove(f"t{4 + (i + 2) % 4}")
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


def test_catalog_upsert_is_idempotent_and_protects_trained_tasks():
    index = PrototypeIndex(DIM)
    trained = TaskEntry(name="rte", source="trained", vector=unit(0))
    catalog = TaskCatalog(index, [trained])
    changes = []
    catalog.subscribe(lambda old, new: changes.append((old and old.name, new and new.name)))
    first = catalog.upsert("new", unit(1), examples=8)
    again = catalog.upsert("new", unit(1), examples=8)
    assert again is first and catalog.version == 2 and changes == [(None, "new")]
    second = catalog.upsert("new", unit(2))
    assert second.version == 3 and second.created == first.created
    assert second.prototype_version != first.prototype_version
    with pytest.raises(ValueError, match="trained"):
        catalog.upsert("rte", unit(3))
    with pytest.raises(ValueError, match="trained"):
        catalog.remove("rte")
    assert catalog.remove("new").name == "new" and catalog.remove("new") is None
    assert index.search(unit(2))[0].task == "rte" and catalog.version == 4


def test_adapted_task_routes_over_http(tiny_checkpoint):
    """A task added through the catalogue hook is searched, served, listed, and gone after removal."""
    text = "premise: A dog runs in a park. hypothesis: An animal is outside."
    with running_app(tiny_checkpoint) as client:
        state = client.app.state.pha
        z = state.engine.encode([text]).z[0]  # the retriever's vector of this very text
        state.catalog.upsert("dogs", z, template="premise: {premise} hypothesis: {hypothesis}", examples=4)
        (p,) = client.post("/predict", json={"inputs": text}).json()["predictions"]
        assert p["task"] == "dogs" and p["routed"] is True and p["score"] == pytest.approx(1.0, abs=1e-4)
        listed = {t["name"]: t for t in client.get("/prototypes").json()["prototypes"]}
        assert listed["dogs"]["source"] == "adapted" and listed["dogs"]["examples"] == 4
        assert client.get("/readyz").json()["tasks"] == 4

        state.catalog.remove("dogs")
        (p,) = client.post("/predict", json={"inputs": text}).json()["predictions"]
        assert p["task"] != "dogs"
        assert client.get("/prototypes/dogs").status_code == 404


def test_adapted_task_with_its_own_routing_key_and_adapters(tiny_checkpoint):
    """The hook takes what adaptation produces: a routing key apart from the prototype, or explicit adapters."""
    text = "sentence1: A dog runs in a park. sentence2: An animal is outside."
    with running_app(tiny_checkpoint) as client:
        state = client.app.state.pha
        engine = state.engine
        rte, mnli = engine.trained_prototypes()[1], engine.trained_prototypes()[2]

        def answer(**body):
            return client.post("/predict", json={"inputs": text, **body}).json()["predictions"][0]

        # Routed by its key (this very text's z) although its prototype points the other way.
        z = engine.encode([text]).z[0]
        state.catalog.upsert("keyed", -z, key=z)
        routed = answer()
        assert routed["task"] == "keyed" and routed["score"] == pytest.approx(1.0, abs=1e-4)
        assert routed["output"] == answer(task="keyed")["output"]
        vectors = client.get("/prototypes/keyed", params={"include_vector": "true"}).json()
        assert vectors["vector"] == pytest.approx((-z).tolist()) and vectors["key"] == pytest.approx(z.tolist())

        # Explicit adapters are served as given (here mnli's), whatever the prototype says.
        labels = state.catalog.get("mnli").labels
        state.catalog.upsert("explicit", rte, adapters=engine.adapters_for_prototype(mnli), labels=labels)
        assert answer(task="explicit")["output"] == answer(task="mnli")["output"]


def test_scan_codes_keep_inner_products_in_the_keys_directions():
    """The codes project onto the top directions of the keys' uncentred second moment: for keys and queries in
    a low-dimensional span (as retrieval vectors near a few task clusters are), code inner products equal the
    exact ones, which a centred projection would not give (its mean term moves every key's score)."""
    from service.cell_index import top_directions

    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((32, 4)))[0].T  # 4 orthonormal directions in 32 dims
    keys = 1.0 + rng.standard_normal((500, 4)) @ basis  # off-centre, so centring would matter
    queries = rng.standard_normal((20, 4)) @ basis
    projection = top_directions(keys.astype(np.float32), 5)
    assert projection.shape == (32, 5)
    exact, coded = queries @ keys.T, (queries @ projection) @ (keys @ projection).T
    assert np.allclose(coded, exact, atol=1e-3)
