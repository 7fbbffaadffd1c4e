"""The adapter cache against real Redis servers: fill, hit, corrupt entries, Redis dying and coming back."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from pha_core.inference import AdapterSet
from tests.support.app import metric, running_app

pytestmark = pytest.mark.redis
TEXT = "sentence1: The cat sat on the mat. sentence2: A cat is sitting."


def tier(client, name: str) -> float:
    return metric(client, "pha_adapter_cache_lookups_total", tier=name)


def model_keys(db: redis.Redis, model_version: str) -> list[bytes]:
    return sorted(db.scan_iter(match=f"pha:adapter:{model_version}:*"))


@pytest.fixture
def clean_redis(redis_url, tiny_checkpoint):
    """The test database without this model's adapter keys (other keys of DB 15 are left alone)."""
    db = redis.Redis.from_url(redis_url)
    with running_app(tiny_checkpoint) as client:  # no Redis: just to learn the model version
        version = client.get("/readyz").json()["model"]
    for key in model_keys(db, version):
        db.delete(key)
    yield db, version
    for key in model_keys(db, version):
        db.delete(key)


def test_fill_then_hit_visible_in_metrics(tiny_checkpoint, redis_url, clean_redis):
    db, version = clean_redis
    with running_app(tiny_checkpoint, redis_url=redis_url, redis_ttl_seconds=600) as first:
        # Warm-up generated the three trained tasks' adapters and stored them in Redis.
        assert tier(first, "regenerated") == 3 and tier(first, "redis") == 0
        keys = model_keys(db, version)
        assert len(keys) == 3
        for key in keys:
            assert 0 < db.ttl(key) <= 600
            AdapterSet.from_bytes(db.get(key), n_layers=1)  # safetensors bytes, never pickle
        l1_before = tier(first, "l1")
        assert first.post("/predict", json={"inputs": TEXT, "task": "rte"}).status_code == 200
        assert tier(first, "l1") == l1_before + 1
    with running_app(tiny_checkpoint, redis_url=redis_url) as second:
        # A new replica (empty L1) finds every task in Redis.
        assert tier(second, "redis") == 3 and tier(second, "regenerated") == 0
        assert second.get("/readyz").json()["redis"] == "ok"


def test_corrupt_entry_is_regenerated_and_replaced(tiny_checkpoint, redis_url, clean_redis):
    db, version = clean_redis
    with running_app(tiny_checkpoint, redis_url=redis_url):
        pass  # fill Redis
    (rte_key,) = [k for k in model_keys(db, version) if b":rte:" in k]
    db.set(rte_key, b"not safetensors")
    with running_app(tiny_checkpoint, redis_url=redis_url) as client:
        assert tier(client, "redis") == 2 and tier(client, "regenerated") == 1
        assert client.post("/predict", json={"inputs": TEXT, "task": "rte"}).status_code == 200
    AdapterSet.from_bytes(db.get(rte_key), n_layers=1)


def test_redis_stopped_mid_test(tiny_checkpoint, private_redis):
    settings = dict(redis_url=private_redis.url, l1_cache_size=1, redis_timeout_seconds=0.2, redis_backoff_seconds=0.5)
    with running_app(tiny_checkpoint, **settings) as client:
        assert client.get("/readyz").json()["redis"] == "ok"
        # With one L1 slot, alternating tasks must go to Redis every time.
        for task in ("sst2", "rte", "mnli"):
            assert client.post("/predict", json={"inputs": TEXT, "task": task}).status_code == 200
        assert tier(client, "redis") >= 3

        private_redis.stop()
        start = time.perf_counter()
        for task in ("sst2", "rte", "mnli", "sst2", "rte", "mnli"):
            response = client.post("/predict", json={"inputs": TEXT, "task": task})
            assert response.status_code == 200 and response.json()["predictions"][0]["task"] == task
        # Back-off: one failed call (0.2 s timeout at most), not one per request.
        assert time.perf_counter() - start < 3.0
        assert 1 <= metric(client, "pha_redis_errors_total") <= 3
        assert tier(client, "regenerated") >= 6
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] == "degraded"
        assert ready.json()["redis_error"]
        assert metric(client, "pha_redis_up") == 0

        private_redis.start()
        time.sleep(0.6)  # past the back-off
        assert client.get("/readyz").json()["redis"] == "ok"
        assert metric(client, "pha_redis_up") == 1


def test_catalog_change_drops_stale_adapters(tiny_checkpoint, redis_url, clean_redis):
    db, version = clean_redis
    with running_app(tiny_checkpoint, redis_url=redis_url) as client:
        catalog = client.app.state.pha.catalog
        rng = np.random.default_rng(0)
        catalog.upsert("mytask", rng.standard_normal(16).astype(np.float32))
        regenerated = tier(client, "regenerated")
        assert client.post("/predict", json={"inputs": TEXT, "task": "mytask"}).status_code == 200
        assert tier(client, "regenerated") == regenerated + 1
        old_keys = [k for k in model_keys(db, version) if b":mytask:" in k]
        assert len(old_keys) == 1

        catalog.upsert("mytask", rng.standard_normal(16).astype(np.float32))  # a new prototype: old adapters stale
        assert client.post("/predict", json={"inputs": TEXT, "task": "mytask"}).status_code == 200
        assert tier(client, "regenerated") == regenerated + 2  # not an L1 hit on the old adapters
        deadline = time.monotonic() + 2
        while db.exists(old_keys[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not db.exists(old_keys[0])


def test_l1_is_bounded_in_bytes(tiny_checkpoint):
    """With a byte budget of 2.5 adapter sets, the L1 keeps the two most recent and never more bytes."""
    import asyncio

    from service.cache import AdapterCache
    from service.telemetry import Metrics

    with running_app(tiny_checkpoint) as client:
        state = client.app.state.pha
        entries = state.catalog.entries()
        engine = state.engine
        size = engine.adapters_for_prototype(entries[0].vector).nbytes
        cache = AdapterCache(
            model_version=engine.model_version,
            n_layers=engine.model.n_decoder_layers,
            l1_size=100,
            redis=None,
            metrics=Metrics(),
            l1_bytes=int(2.5 * size),
        )

        async def generate(entry):
            return engine.adapters_for_prototype(entry.vector)

        async def fill():
            for entry in entries:
                await cache.get_or_create(entry, generate)
            return await cache.get_or_create(entries[-1], generate)

        _, tier = asyncio.run(fill())
    assert len(entries) >= 3 and len(cache) == 2 and cache.l1_bytes == 2 * size and tier == "l1"
