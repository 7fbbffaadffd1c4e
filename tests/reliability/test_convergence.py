"""Two `pha serve` replicas on one registry store converge after a burst of imports and deletions while one of
them is SIGKILLed and restarted (real processes, real HTTP, a private redis-server), on both stores."""

from __future__ import annotations

import time

import numpy as np
import pytest
from reliability_helpers import AUTH, KEY

from service.registry import SqliteRegistry, all_changes
from service.registry.redis_store import RedisRegistry
from tests.support.polling import wait_for
from tests.support.processes import ApiServer
from tests.support.redis_server import PrivateRedis, needs_redis_server

pytestmark = [pytest.mark.slow, pytest.mark.redis]
BURST = 60  # imports; every third one also deletes the one before it


def adapted(api: ApiServer) -> dict[str, str]:
    """The adapted tasks a replica serves, name -> prototype_version."""
    with api.client() as c:
        listed = c.get("/prototypes").json()["prototypes"]
    return {p["name"]: p["prototype_version"] for p in listed if p["source"] == "adapted"}


def ready(api: ApiServer) -> dict:
    with api.client() as c:
        return c.get("/readyz").json()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_two_replicas_converge_after_a_burst_while_one_restarts(tiny_checkpoint, tmp_path, store):
    needs_redis_server()
    with PrivateRedis(tmp_path / "redis", appendfsync="always") as redis_server:
        settings = {
            "PHA_CHECKPOINT": str(tiny_checkpoint),
            "PHA_REDIS_URL": redis_server.url,
            "PHA_REGISTRY_STORE": store,
            "PHA_REGISTRY_DIR": str(tmp_path / "registry"),
            "PHA_API_KEY": KEY,
            "PHA_REGISTRY_POLL_SECONDS": "0.3",
            "PHA_LOG_LEVEL": "WARNING",
            "PHA_TORCH_THREADS": "1",  # two servers and the test share 2 cores
        }
        with ApiServer(settings, tmp_path / "a.log") as a, ApiServer(settings, tmp_path / "b.log") as b:
            model = a.wait_ready()["model"]
            rng = np.random.default_rng(0)
            expected: set[str] = set()
            started = time.perf_counter()
            with a.client() as c:
                for i in range(BURST):
                    if i == BURST // 3:
                        b.kill()  # mid-burst: b misses the notices of what follows
                    if i == 2 * BURST // 3:
                        b.start()  # a fresh b catches up from the store while the burst goes on
                    body = {"vector": rng.standard_normal(16).tolist(), "model": model, "labels": ["yes", "no"]}
                    assert c.put(f"/prototypes/burst-{i}", json=body, headers=AUTH).status_code == 201
                    expected.add(f"burst-{i}")
                    if i % 3 == 2:
                        assert c.delete(f"/prototypes/burst-{i - 1}", headers=AUTH).status_code == 200
                        expected.discard(f"burst-{i - 1}")
            b.wait_ready()
            wait_for(lambda: set(adapted(a)) == expected and set(adapted(b)) == expected, 30, "both replicas")
            converged = time.perf_counter() - started
            assert adapted(a) == adapted(b), "the same tasks, with the same prototypes"
            head = _head(store, tmp_path, redis_server.url)
            assert ready(a)["registry_version"] == ready(b)["registry_version"] == head
            assert ready(a)["registry_error"] is None and ready(b)["registry_error"] is None
    print(
        f"CONVERGE store={store} imports={BURST} deletions={BURST // 3} live={len(expected)} head={head} "
        f"b_restarted=yes seconds={converged:.1f}"
    )


def _head(store: str, tmp_path, url: str) -> int:
    registry = SqliteRegistry.in_folder(tmp_path / "registry") if store == "sqlite" else RedisRegistry(url)
    try:
        assert len(list(all_changes(registry))) == BURST  # one row per name: live tasks and tombstones
        return registry.head()
    finally:
        registry.close()
