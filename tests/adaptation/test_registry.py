"""The registry stores (sqlite and redis) against one contract: a change log with sequence numbers, idempotent by
job id, one conflict rule, safe names, corrupt records refused and named, nothing lost to kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import redis

from service.redis_names import REGISTRY_TASK
from service.registry import NameTaken, RegisteredTask, SqliteRegistry, all_changes, check_name, live
from service.registry.redis_store import RedisRegistry
from tests.support.redis_server import PrivateRedis

ROOT = Path(__file__).resolve().parents[2]


def _task(name="cb", job="job-1", **extra):
    return RegisteredTask(name=name, mode="prototype", job_id=job, model_version="v1", source_task="mnli", **extra)


def _clear(url: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match="pha:registry:*"))
    if keys:
        client.delete(*keys)


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SqliteRegistry.in_folder(tmp_path)
    else:
        url = request.getfixturevalue("redis_url")
        _clear(url)
        s = RedisRegistry(url)
    yield s
    s.close()
    if request.param == "redis":
        _clear(url)


def _corrupt(store, name: str) -> None:
    """Flip the stored tensors of `name` behind the store's back (a disk or operator fault)."""
    if isinstance(store, SqliteRegistry):
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE tasks SET tensors = ? WHERE name = ?", (b"flipped", name))
    else:
        store.r.hset(REGISTRY_TASK.format(name), "tensors", b"flipped")


def test_register_then_read_back(store):
    entry, created = store.register(_task(), b"tensor-bytes")
    assert created and entry.seq == 1 and store.head() == 1
    (change,) = store.changes(0)
    assert change.name == "cb" and change.task.source_task == "mnli" and change.tensors == b"tensor-bytes"
    assert store.get("cb").task.job_id == "job-1" and store.get("nope") is None


def test_same_job_registers_once(store):
    store.register(_task(), b"a")
    entry, created = store.register(_task(), b"a-second-run")
    assert not created and store.head() == 1 and store.get("cb").tensors == b"a"


def test_other_job_for_an_existing_name_needs_replace(store):
    store.register(_task(), b"a")
    with pytest.raises(NameTaken, match='"replace": true'):
        store.register(_task(job="job-2"), b"b")
    entry, created = store.register(_task(job="job-2"), b"b", replace=True)
    assert created and entry.seq == 2 and store.get("cb").tensors == b"b"
    assert [c.seq for c in store.changes(0)] == [2], "one row per task: the latest state"


def test_removal_is_a_change_replicas_see(store):
    store.register(_task(), b"a")
    store.register(_task("wic", "job-2"), b"b")
    assert store.remove("cb").name == "cb" and store.remove("cb") is None
    changes = store.changes(1)
    assert [(c.seq, c.name, c.task is None) for c in changes] == [(2, "wic", False), (3, "cb", True)]
    assert set(live(store)) == {"wic"} and store.get("cb") is None
    entry, created = store.register(_task(), b"again")  # a removed name can be taken again
    assert created and entry.seq == 4


def test_changes_after_a_cursor_come_in_pages(store):
    for i in range(25):
        store.register(_task(f"t{i}", f"job-{i}"), b"x")
    assert [c.seq for c in store.changes(20)] == [21, 22, 23, 24, 25]
    assert [c.seq for c in store.changes(0, limit=3)] == [1, 2, 3]
    assert len(list(all_changes(store))) == 25


@pytest.mark.parametrize("name", ["../etc", "a/b", "a\\b", "", "A", "x" * 65, "bad\nname", ".hidden", "a..b"])
def test_names_that_could_escape_or_confuse_are_refused(name, store):
    with pytest.raises(ValueError, match="invalid task name"):
        check_name(name)
    with pytest.raises(ValueError):
        store.register(_task(name=name), b"x")
    assert store.head() == 0


def test_a_corrupt_record_is_refused_and_named_and_the_rest_is_read(store):
    store.register(_task(), b"abc")
    store.register(_task("wic", "job-2"), b"def")
    _corrupt(store, "cb")
    bad, good = store.changes(0)
    assert bad.task is None and "'cb'" in bad.error and "corrupt" in bad.error
    assert good.task.name == "wic" and good.error is None
    assert store.remove("cb") is not None and store.get("cb") is None  # removing it is how it is repaired


def test_concurrent_writers_get_distinct_sequence_numbers(store, tmp_path):
    """Four writers with their own connections: every registration lands once, seqs 1..N without gaps."""
    open_other = (lambda: SqliteRegistry(store.path)) if isinstance(store, SqliteRegistry) else None
    stores = [
        open_other() if open_other else RedisRegistry("", client=redis.Redis.from_url(_url(store))) for _ in range(4)
    ]

    def write(w: int) -> None:
        for i in range(20):
            stores[w].register(_task(f"w{w}-{i}", f"job-{w}-{i}"), b"x")

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c.seq for c in store.changes(0, limit=1000)) == list(range(1, 81)) and store.head() == 80
    for s in stores:
        s.close()


def _url(store: RedisRegistry) -> str:
    kw = store.r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw['db']}"


def test_a_prototype_mode_task_is_under_one_kilobyte(store):
    from pha_core.adapt import AdaptedTensors

    v = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    task = _task(
        "a-task-name",
        "f" * 32,
        k=16,
        steps=200,
        final_loss=0.1234,
        source_score=0.87,
        labels=["entailment", "contradiction", "neutral"],
        spread=[0.81, 0.05],
        template="premise: {premise}",
    )
    tensors = AdaptedTensors(v, v * 0.5, None).to_bytes()
    size = len(task.to_json()) + len(tensors) + 32  # + digest
    assert size <= 1024, size


WRITER = textwrap.dedent(
    """
    import sys
    from service.registry import RegisteredTask, SqliteRegistry
    from service.registry.redis_store import RedisRegistry
    kind, where = sys.argv[1], sys.argv[2]
    store = SqliteRegistry(where) if kind == "sqlite" else RedisRegistry(where)
    for i in range(100000):
        task = RegisteredTask(name=f"t{i}", mode="prototype", job_id=f"job-{i}", model_version="v1")
        store.register(task, b"x" * 600)
        print(i, flush=True)  # acknowledged
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_kill_9_mid_registration_loses_nothing_acknowledged(kind, tmp_path):
    """A writer registers as fast as it can and is SIGKILLed; for redis, redis-server itself is SIGKILLed too
    (appendfsync always, as the redis store's docs require) and restarted from its AOF."""
    server = None
    if kind == "sqlite":
        where = str(tmp_path / "registry.sqlite3")
    else:
        server = PrivateRedis(tmp_path / "redis", appendfsync="always").start()
        where = server.url
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, kind, where], stdout=subprocess.PIPE, text=True, env=env)
    acknowledged = -1
    for line in writer.stdout:
        acknowledged = int(line)
        if acknowledged >= 150:
            break
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    if server is not None:
        server.kill()
        server.start()
    reopened = SqliteRegistry(where) if kind == "sqlite" else RedisRegistry(where)
    changes = list(all_changes(reopened))
    names = {c.name for c in changes}
    print(f"KILL-REGISTRY {kind}: acknowledged {acknowledged + 1}, stored {len(changes)}")
    assert all(f"t{i}" in names for i in range(acknowledged + 1)), "an acknowledged registration was lost"
    assert all(c.error is None and c.tensors == b"x" * 600 for c in changes), "a half-written record"
    assert [c.seq for c in changes] == list(range(1, len(changes) + 1))
    reopened.close()
    if server is not None:
        server.kill()


def test_a_registry_folder_of_the_earlier_layout_is_imported_once(tmp_path):
    """manifest.json + tasks/<file>: the tasks move into the store, verified, and the manifest is set aside."""
    import hashlib
    import json

    (tmp_path / "tasks").mkdir()
    tasks = {}
    for i, name in enumerate(["cb", "wic"]):
        data = f"tensors-{i}".encode()
        file = f"{name}-{hashlib.sha256(data).hexdigest()[:12]}.safetensors"
        (tmp_path / "tasks" / file).write_bytes(data)
        tasks[name] = {
            "name": name,
            "mode": "prototype",
            "job_id": f"job-{i}",
            "model_version": "v1",
            "file": file,
            "sha256": hashlib.sha256(data).hexdigest(),
            "k": 16,
        }
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 2, "tasks": tasks}))
    store = SqliteRegistry.in_folder(tmp_path)
    assert {c.name: c.tensors for c in store.changes(0)} == {"cb": b"tensors-0", "wic": b"tensors-1"}
    assert store.get("wic").task.k == 16 and store.head() == 2
    assert not (tmp_path / "manifest.json").exists() and (tmp_path / "manifest.json.migrated").exists()
    store.close()


def test_an_unreadable_earlier_layout_is_refused_and_named(tmp_path):
    (tmp_path / "manifest.json").write_text('{"version": 1, "tasks": {"cb": {"file": "gone"}}}')
    store = SqliteRegistry.in_folder(tmp_path)
    with pytest.raises(Exception, match="earlier layout"):
        store.head()
    assert (tmp_path / "manifest.json").exists()


def test_a_fresh_replica_serves_what_the_log_says_across_pages(store):
    """A replica catching up from 0 over more than two pages (tensors decoded a page at a time): files of two
    layouts, removals, a replacement, a corrupt record and a zero key. It serves exactly the live, servable tasks,
    each with the vectors its stored file holds, and names the two it refuses."""
    from safetensors.numpy import save as np_save

    from pha_core.adapt import AdaptedTensors
    from service.adaptation import RegistrySync
    from service.catalog import TaskCatalog
    from service.registry import PAGE
    from service.routing import PrototypeIndex
    from service.telemetry import Metrics

    rng = np.random.default_rng(0)
    files = {}
    for i in range(2 * PAGE + 300):
        key = rng.standard_normal(16).astype(np.float32)  # every 7th in float32: read alone, mid-page
        files[f"t{i}"] = (
            np_save({"prototype": key, "key": key}) if i % 7 == 3 else AdaptedTensors(key, key, None).to_bytes()
        )
    files["zero"] = AdaptedTensors(np.zeros(16), np.zeros(16), None).to_bytes()
    store.register_many([(_task(name, f"job-{name}"), data) for name, data in files.items()])
    for name in ("t5", "t1500"):
        store.remove(name)
        del files[name]
    files["t10"] = AdaptedTensors(np.ones(16), -np.ones(16), None).to_bytes()
    store.register(_task("t10", "job-t10-again"), files["t10"], replace=True)
    _corrupt(store, "t20")

    catalog = TaskCatalog(PrototypeIndex(16))
    sync = RegistrySync(store, catalog, "v1", 1, Metrics())
    assert sync.apply() == store.head()
    assert set(sync.refused) == {"t20", "zero"} and "'t20'" in sync.error
    assert set(catalog.names()) == set(files) - {"t20", "zero"}
    for name in catalog.names():
        alone = AdaptedTensors.from_bytes(files[name], n_layers=1)
        entry = catalog.get(name)
        np.testing.assert_array_equal(entry.vector, alone.prototype)
        np.testing.assert_array_equal(entry.key, alone.key)
    assert catalog.index.search(-np.ones((1, 16), np.float32))[0].task == "t10", "routed by its replaced key"


def test_a_worker_follows_the_rivals_a_page_at_a_time(store):
    """The worker's index of other tasks' keys (service.worker.Rivals): built in bulk over pages, then patched by
    later changes; removed, foreign-model, corrupt and zero-key tasks are never rivals."""
    from pha_core.adapt import AdaptedTensors
    from service.registry import PAGE
    from service.worker import Rivals

    rng = np.random.default_rng(1)
    live = {f"r{i}": rng.standard_normal(16) for i in range(PAGE + 200)}
    store.register_many(
        [(_task(name, f"job-{name}"), AdaptedTensors(v, v, None).to_bytes()) for name, v in live.items()]
    )
    foreign = RegisteredTask(name="other-model", mode="prototype", job_id="job-o", model_version="v2")
    store.register(foreign, AdaptedTensors(np.ones(16), np.ones(16), None).to_bytes())
    store.register(_task("zero", "job-z"), AdaptedTensors(np.zeros(16), np.zeros(16), None).to_bytes())
    store.remove("r3")
    _corrupt(store, "r4")
    rivals = Rivals(store, "v1", 1, 16)
    rivals.refresh()
    expected = set(live) - {"r3", "r4"}
    assert len(rivals.keys) == len(expected) and all(name in rivals.keys for name in expected)
    store.register(_task("late", "job-late"), AdaptedTensors(-np.ones(16), -np.ones(16), None).to_bytes())
    store.remove("r5")
    rivals.refresh()
    assert "late" in rivals.keys and "r5" not in rivals.keys and len(rivals.keys) == len(expected)
    nearest = rivals.keys.nearest_keys(-np.ones(16, np.float32), 1)
    np.testing.assert_allclose(nearest[0], -np.ones(16) / 4, atol=1e-3)
