"""Scale benchmark: the registry, a replica's catch-up and routing at 10k, 100k and 1M tasks.

    python bench/scale.py --sizes 10000 100000 1000000 --serve --output bench/results/scale_cpu.json
    python bench/scale.py --sizes 10000 --store redis          # a private redis-server, as k8s runs it

Tasks are prototype-mode tasks as `pha adapt` / PUT /prototypes make them, with routing keys drawn around the
retrieval vectors z of real inputs (GLUE test rows through the bundled demo, when $PHA_DATA_DIR has the data;
else the OOD set's texts), so the index sees the geometry real traffic has: key = unit(z_i + noise), the
noise's size set so a key's cosine to its own z is ~0.87. Queries are the z of other real inputs.

Per size, in a fresh store:
1. `register`: N - R tasks loaded in batches of 10k (`register_many`), then R single registrations timed
   (p50/p99: one change at size N), and the durable bytes per task (the SQLite file; for Redis the
   append-only files after a rewrite, and its memory beside them).
2. A fresh replica (a child process, so its RSS is its own): the demo model loaded, then `RegistrySync.apply`
   from 0 (every task read, checked, decoded, put in the catalogue and the index); its wall time, and the RSS the
   catalogue + index add.
3. In that replica: one change applied (a registration by another writer, then `apply`), p50/p99 over 200;
   routing (encode excluded, on the routing thread) at batch 1 (1,000 queries) and 32 (5 passes over them, in
   other orders: ~155 batches), p50/p99/max; recall@1 of routing against exact search over every key.
4. In that process, a worker's catch-up: `service.worker.Rivals.refresh` (every adapted task's key indexed, what
   a worker does before its first job).
5. With `--serve`: `pha serve` itself started on the store (the HTTP app, the bundled demo), timed from the
   process's start to its first /readyz 200 (imports, model, catch-up and warm-up), and its RSS then.

Not a test: numbers depend on the machine, which is printed and written with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import machine, write_result  # noqa: E402

SINGLE = 500  # registrations timed one by one at size N
CHANGES = 200  # changes a running replica applies, timed one by one
QUERIES = 1000  # real inputs routed (batch 1), and in batches of 32
BATCH_PASSES = 5  # passes over the queries in batches of 32, each in another order
# The registry's Redis as k8s/base/redis.yaml runs it: a task's hash (5 fields, the largest its ~650-byte tensors)
# stays a listpack: ~1.2 KB of memory a task instead of ~1.7 KB as a hash table (100k tasks, session 16).
REDIS_OPTIONS = ("--hash-max-listpack-value", "1024")
NOISE = 0.05  # per-dimension noise on unit z (128 dims): cos(key, z) ~ 1/sqrt(1 + 128 * 0.05^2) = 0.87


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "n": len(ms),
    }


def batch_orders(n: int) -> list[np.ndarray]:
    """The queries' orders for batches of 32: as drawn, then BATCH_PASSES - 1 shuffles (other batch mixes), so a
    p99 is estimated from ~155 batches rather than being the slowest of 31."""
    rng = np.random.default_rng(1)
    return [np.arange(n)] + [rng.permutation(n) for _ in range(BATCH_PASSES - 1)]


# ------------------------------------------------------------------------------------------ real z vectors
def real_z(path: Path, rows_per_task: int) -> None:
    """The demo's retrieval vectors of real inputs, saved as [M, 128] float32 (shuffled)."""
    from pha_core.data import data_dir_from_env, load_splits
    from service.loader import load_model
    from service.settings import Settings

    engine = load_model(Settings()).engine
    data_dir = data_dir_from_env()
    if data_dir is not None and (data_dir / "SST-2").is_dir():
        splits = load_splits(engine.tasks, data_dir, seed=42, max_eval=rows_per_task)
        texts = [e.input for t in engine.tasks for e in splits[t]["test"]]
    else:
        from bench.ood import ood_set

        texts = [item.text for item in ood_set(data_dir)]
    z = np.concatenate([np.asarray(engine.encode(texts[i : i + 64]).z) for i in range(0, len(texts), 64)])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    np.save(path, np.random.default_rng(0).permutation(z).astype(np.float32))


def keys_for(z_base: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Routing keys of tasks start..stop-1: each drawn around one real z (deterministic per task index)."""
    out = np.empty((stop - start, z_base.shape[1]), np.float32)
    for j in range(start, stop):
        rng = np.random.default_rng(j)
        v = z_base[j % len(z_base)] + NOISE * rng.standard_normal(z_base.shape[1]).astype(np.float32)
        out[j - start] = v / np.linalg.norm(v)
    return out


def task_record(j: int, model_version: str):
    from service.registry import RegisteredTask

    return RegisteredTask(
        name=f"task-{j:07d}",
        mode="imported",
        job_id=f"import-{j:024x}",
        model_version=model_version,
        k=16,
        labels=["yes", "no"],
        spread=[0.85, 0.04],
    )


def tensors_of(key: np.ndarray) -> bytes:
    from pha_core.adapt import AdaptedTensors

    return AdaptedTensors(key, key, None).to_bytes()  # prototype = key: its values do not matter here


# -------------------------------------------------------------------------------------------- the writer
def open_store(kind: str, where: str):
    from service.registry import SqliteRegistry
    from service.registry.redis_store import RedisRegistry

    return SqliteRegistry(where) if kind == "sqlite" else RedisRegistry(where)


def durable_bytes(kind: str, where: str, store, folder: Path | None = None) -> int:
    """What the store keeps on disk: the SQLite file (and its WAL), or Redis's append-only files after a rewrite
    (what a restarted Redis replays: its base is an RDB image, as `aof-use-rdb-preamble` makes it by default)."""
    if kind == "sqlite":
        return sum(p.stat().st_size for p in Path(where).parent.glob(Path(where).name + "*"))
    if folder is None:
        return 0

    def rewriting() -> bool:
        info = store.r.info("persistence")
        return bool(int(info["aof_rewrite_in_progress"]) or int(info["aof_rewrite_scheduled"]))

    while rewriting():  # one Redis started itself as the file grew: it may predate the last writes
        time.sleep(0.2)
    store.r.bgrewriteaof()
    while rewriting():
        time.sleep(0.2)
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix != ".log")


def fill(kind: str, where: str, n: int, z_base: np.ndarray, model_version: str, folder: Path | None = None) -> dict:
    store = open_store(kind, where)
    before = durable_bytes(kind, where, store, folder)
    memory_before = int(store.r.info("memory")["used_memory"]) if kind == "redis" else 0
    start = time.perf_counter()
    bulk = n - SINGLE
    for lo in range(0, bulk, 10_000):
        hi = min(bulk, lo + 10_000)
        keys = keys_for(z_base, lo, hi)
        store.register_many([(task_record(j, model_version), tensors_of(keys[j - lo])) for j in range(lo, hi)])
    loaded = time.perf_counter() - start
    single = []
    keys = keys_for(z_base, bulk, n)
    for j in range(bulk, n):
        task, tensors = task_record(j, model_version), tensors_of(keys[j - bulk])
        t0 = time.perf_counter()
        store.register(task, tensors)
        single.append(time.perf_counter() - t0)
    size = durable_bytes(kind, where, store, folder) - before
    row = {"bulk_load_seconds": loaded, "register": percentiles(single), "durable_bytes_per_task": size / n}
    if kind == "redis":
        row["redis_memory_bytes_per_task"] = (int(store.r.info("memory")["used_memory"]) - memory_before) / n
    store.close()
    return row


# ------------------------------------------------------------------------------------------- the replica
def replica(kind: str, where: str, n: int, z_path: Path) -> dict:
    """A fresh replica's figures (runs in its own process)."""
    from service.adaptation import RegistrySync
    from service.catalog import TaskCatalog, trained_entries
    from service.cell_index import REDUCED_DIMS, REFINE
    from service.loader import load_model
    from service.routing import PrototypeIndex, search_thread
    from service.settings import Settings
    from service.telemetry import Metrics

    t0 = time.perf_counter()
    loaded = load_model(Settings())  # the bundled demo
    engine = loaded.engine
    model_seconds = time.perf_counter() - t0
    rss_before = rss_mb()
    t0 = time.perf_counter()
    settings = Settings()
    index = PrototypeIndex(
        engine.config.proto_dim, nprobe=settings.faiss_nprobe, ivf_threads=settings.faiss_ivf_threads
    )
    catalog = TaskCatalog(index, trained_entries(engine.tasks, engine.trained_prototypes(), loaded.created))
    store = open_store(kind, where)
    sync = RegistrySync(store, catalog, engine.model_version, engine.model.n_decoder_layers, Metrics())
    sync.apply()
    catch_up = time.perf_counter() - t0
    rss_after = rss_mb()
    assert len(catalog) == n + len(engine.tasks), (len(catalog), sync.error)

    z = np.load(z_path)
    half = len(z) // 2
    z_base, queries = z[:half], z[half : half + QUERIES]
    writer = open_store(kind, where)
    applied = []
    for j in range(n, n + CHANGES):
        writer.register(task_record(j, engine.model_version), tensors_of(keys_for(z_base, j, j + 1)[0]))
        t0 = time.perf_counter()
        sync.apply()
        applied.append(time.perf_counter() - t0)
    removed = []
    for j in range(n, n + CHANGES // 4):
        writer.remove(f"task-{j:07d}")
        t0 = time.perf_counter()
        sync.apply()
        removed.append(time.perf_counter() - t0)
    writer.close()

    thread = search_thread(1)  # as the server routes: one thread, one OpenMP thread

    def timed(batch: np.ndarray) -> tuple[float, list]:
        t = time.perf_counter()
        routes = index.search(batch)
        return time.perf_counter() - t, routes

    thread.submit(timed, queries[:32]).result()  # first call
    one = [thread.submit(timed, queries[i : i + 1]).result() for i in range(len(queries))]
    batches = []
    for order in batch_orders(len(queries)):
        batches += [thread.submit(timed, queries[order[i : i + 32]]).result() for i in range(0, len(order) - 31, 32)]
    found = [r[0].task for _, r in one]
    thread.shutdown()

    # Exact search over every key the catalogue holds (trained tasks and the registered ones), in chunks.
    live = n + CHANGES - CHANGES // 4
    best = np.full(len(queries), -np.inf, np.float32)
    best_name = [""] * len(queries)
    trained = engine.trained_prototypes()
    trained = trained / np.linalg.norm(trained, axis=1, keepdims=True)
    s = queries @ trained.T
    for q, i in enumerate(np.argmax(s, axis=1)):
        best[q], best_name[q] = s[q, i], engine.tasks[i]
    removed_ids = set(range(n, n + CHANGES // 4))
    for lo in range(0, n + CHANGES, 50_000):
        hi = min(n + CHANGES, lo + 50_000)
        keys = keys_for(z_base, lo, hi)
        keys = keys.astype(np.float16).astype(np.float32)  # as stored (float16), then normalised by the index
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        s = queries @ keys.T
        for j in removed_ids & set(range(lo, hi)):
            s[:, j - lo] = -np.inf
        arg = np.argmax(s, axis=1)
        for q, i in enumerate(arg):
            if s[q, i] > best[q]:
                best[q], best_name[q] = s[q, i], f"task-{lo + i:07d}"
    recall = float(np.mean([a == b for a, b in zip(found, best_name, strict=True)]))
    # How much a miss costs: the exact cosine of the best key minus that of the routed task's key (0 for a hit).
    # Keys sit ~500 around each real z, so a query's best keys are near-ties; the floor is recall@1 all the same.
    routed = [exact_cosine(q, name, z_base, trained, engine.tasks) for q, name in zip(queries, found, strict=True)]
    regret = best - np.array(routed)
    regret = np.maximum(regret, 0.0)
    assert len(catalog) == live + len(engine.tasks)
    # A worker starting on the store: its index of the other tasks' keys (what a new task keeps clear of).
    from service.worker import Rivals

    model = engine.model
    rivals = Rivals(open_store(kind, where), engine.model_version, model.n_decoder_layers, engine.config.proto_dim)
    t0 = time.perf_counter()
    rivals.refresh()
    worker_seconds = time.perf_counter() - t0
    assert len(rivals.keys) == live
    return {
        "worker_catch_up_seconds": worker_seconds,
        "model_load_seconds": model_seconds,
        "catch_up_seconds": catch_up,
        "fresh_replica_serves_after_seconds": model_seconds + catch_up,
        "catalog_index_rss_mb": rss_after - rss_before,
        "rss_mb": rss_after,
        "apply_one_registration": percentiles(applied),
        "apply_one_removal": percentiles(removed),
        "route_batch_1": percentiles([t for t, _ in one]),
        "route_batch_32": percentiles([t for t, _ in batches]),
        "recall_at_1": recall,
        "recall_at_1_within_0.005": float(np.mean(regret <= 0.005)),
        "regret_p99": float(np.percentile(regret, 99)),
        "index": {
            "flat_max": index.flat_max,
            "nprobe": index.nprobe,
            "ivf_threads": index.ivf_threads,
            "reduced_dims": REDUCED_DIMS,
            "refine": REFINE,
        },
    }


def serve(kind: str, where: str, tmp: Path) -> dict:
    """`pha serve` itself (the HTTP app, a process of its own, the bundled demo) started on the store: seconds from
    the process's start to its first /readyz 200 (imports, model, catch-up, warm-up), and its RSS then."""
    from tests.support.processes import ApiServer, rss_kib

    settings = {"PHA_REGISTRY_STORE": kind, "PHA_LOG_LEVEL": "WARNING"}
    settings.update({"PHA_REGISTRY_DIR": str(Path(where).parent)} if kind == "sqlite" else {"PHA_REDIS_URL": where})
    start = time.perf_counter()
    with ApiServer(settings, tmp / "serve.log") as api:  # start() returns at the first /readyz 200
        seconds = time.perf_counter() - start
        ready = api.wait_ready()
        rss = rss_kib(api.process.pid) / 1024
    return {"serve_ready_seconds": seconds, "serve_tasks": ready["tasks"], "serve_rss_mb": rss}


def exact_cosine(query: np.ndarray, name: str, z_base: np.ndarray, trained: np.ndarray, tasks: list[str]) -> float:
    """The cosine of `query` to task `name`'s key as stored (float16, normalised), computed exactly."""
    if name in tasks:
        return float(query @ trained[tasks.index(name)])
    j = int(name.removeprefix("task-"))
    key = keys_for(z_base, j, j + 1)[0].astype(np.float16).astype(np.float32)
    return float(query @ (key / np.linalg.norm(key)))


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    p.add_argument("--rows-per-task", type=int, default=500, help="real inputs per task for the z vectors")
    p.add_argument("--output", default="bench/results/scale_cpu.json")
    p.add_argument(
        "--serve", action="store_true", help="also start `pha serve` on each store and time it to /readyz 200"
    )
    p.add_argument("--replica", nargs=4, metavar=("KIND", "WHERE", "N", "Z"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.replica:
        kind, where, n, z_path = args.replica
        print(json.dumps(replica(kind, where, int(n), Path(z_path))))
        return 0

    from service.loader import load_model
    from service.settings import Settings

    model_version = load_model(Settings()).engine.model_version
    results = {"settings": vars(args) | {"noise": NOISE, "single": SINGLE, "changes": CHANGES}, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="pha-scale-") as tmp:
        z_path = Path(tmp) / "z.npy"
        real_z(z_path, args.rows_per_task)
        z = np.load(z_path)
        z_base = z[: len(z) // 2]
        results["real_inputs"] = len(z)
        for n in args.sizes:
            server, folder = None, Path(tmp) / f"registry-{n}"
            if args.store == "sqlite":
                folder.mkdir()
                where = str(folder / "registry.sqlite3")  # the file name `pha serve` opens in PHA_REGISTRY_DIR
            else:
                from tests.support.redis_server import PrivateRedis

                server = PrivateRedis(Path(tmp) / f"redis-{n}", appendfsync="always", options=REDIS_OPTIONS).start()
                where = server.url
            try:
                row = fill(args.store, where, n, z_base, model_version, server.folder if server else None)
                child = subprocess.run(
                    [sys.executable, __file__, "--replica", args.store, where, str(n), str(z_path)],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
                row.update(json.loads(child.stdout.strip().splitlines()[-1]))
                if args.serve:
                    row.update(serve(args.store, where, Path(tmp)))
            finally:
                if server is not None:
                    server.kill()
                shutil.rmtree(folder, ignore_errors=True)
            results["sizes"][str(n)] = row
            print(f"{n} tasks ({args.store}): " + json.dumps(row), flush=True)
            write_result(args.output, results)
    print(f"machine: {machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
