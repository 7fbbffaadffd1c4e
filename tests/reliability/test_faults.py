"""Faults: workers SIGKILLed mid-job again and again, Redis killed and restarted under traffic, the API killed and
restarted during a job, a corrupt or truncated registry. No job is lost or registered twice, and answers go on.

Each test prints one line with its figures (KILL, REDIS, API-RESTART, REGISTRY). bench/soak.py runs the same
tests with larger bounds (PHA_SOAK_KILL_ROUNDS=20, ...).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import redis
from reliability_helpers import (
    AUTH,
    KEY,
    adapt_body,
    register_task,
    registry_state,
    scale,
    stream_state,
)

from service.registry import RegisteredTask
from service.registry.records import digest
from tests.support.app import metric, running_app
from tests.support.jobs import wait_job
from tests.support.polling import wait_for
from tests.support.processes import ApiServer, WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.redis]
STEPS = 500  # about 1.5 s of training on the tiny model: long enough to be killed in the middle
TEXT = "sentence1: The cat sat on the mat. sentence2: A cat is sitting."


def worker_env(tiny_checkpoint, tmp_path, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "PHA_CHECKPOINT": str(tiny_checkpoint),
        "PHA_REDIS_URL": redis_url,
        "PHA_REGISTRY_DIR": str(tmp_path / "registry"),
        "PHA_API_KEY": KEY,
        "PHA_JOB_IDLE_MS": "1000",
        "PHA_MAX_ADAPT_STEPS": "10000",  # long jobs, to be cut in the middle
        "PHA_REGISTRY_POLL_SECONDS": "0.3",
        "PHA_LOG_LEVEL": "INFO",
        # One torch thread: on 2 busy shared cores, 2 OpenMP threads per process once slowed a 2-s job past 2 min.
        "PHA_TORCH_THREADS": "1",
        **extra,
    }


def app_overrides(env: dict[str, str], **extra: object) -> dict[str, object]:
    """The same settings for an in-process app (running_app takes Settings field names)."""
    skip = ("PHA_CHECKPOINT", "PHA_TORCH_THREADS")  # torch threads are per process: leave pytest's alone
    values = {k.removeprefix("PHA_").lower(): v for k, v in env.items() if k not in skip}
    return {**values, "log_level": "WARNING", **extra}


def job(client, job_id: str) -> dict:
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------------------------------ worker SIGKILL
def test_workers_killed_mid_job_again_and_again_lose_no_job_and_register_none_twice(
    tiny_checkpoint, aof_redis, tmp_path
):
    """Round after round a fresh worker takes a job (the previous victim's first: it reclaims it) and is SIGKILLed
    as soon as the job is running. A job absorbs at most max_attempts - 1 kills; a last worker finishes the rest."""
    rounds = scale("kill_rounds", 5)
    max_attempts = 3  # PHA_JOB_MAX_ATTEMPTS' default
    env = worker_env(tiny_checkpoint, tmp_path, aof_redis.url)
    kills: Counter[str] = Counter()
    started = time.perf_counter()
    with running_app(tiny_checkpoint, **app_overrides(env)) as client:
        jobs = {}
        for i in range(rounds // 2 + 2):  # enough jobs to absorb every kill, and one never killed
            response = client.post("/adapt", json=adapt_body(f"killed-{i}", STEPS), headers=AUTH)
            assert response.status_code == 202, response.text
            jobs[response.json()["job_id"]] = f"killed-{i}"
        for r in range(rounds):
            name = f"doomed-{r}"
            with WorkerProcess({**env, "PHA_WORKER_NAME": name}, tmp_path / f"{name}.log") as worker:
                victim, deadline = None, time.monotonic() + 120
                while victim is None:
                    assert worker.alive(), worker.log_tail()
                    assert time.monotonic() < deadline, f"round {r}: no job started\n{worker.log_tail()}"
                    for job_id in jobs:
                        j = job(client, job_id)
                        running = j["state"] == "running" and j["worker"] == name and j["progress"] > 0
                        if running and kills[job_id] < max_attempts - 1:
                            victim = job_id
                            break
                    else:
                        time.sleep(0.05)
                worker.kill()
            kills[victim] += 1
            after = job(client, victim)
            assert after["state"] == "running" and after["progress"] < 1, after  # it died mid-job
        with WorkerProcess({**env, "PHA_WORKER_NAME": "rescuer"}, tmp_path / "rescuer.log") as rescuer:
            finished = {job_id: wait_job(client, job_id, timeout=180, worker=rescuer) for job_id in jobs}
        wait_for(lambda: all(client.get(f"/prototypes/{t}").status_code == 200 for t in jobs.values()), 20, "sync")

    attempts = {jobs[j]: f["attempts"] for j, f in finished.items()}
    registered_by_a_rerun = sum(not f["result"]["registered"] for f in finished.values())
    m = registry_state(tmp_path / "registry")
    pending = stream_state(redis.Redis.from_url(aof_redis.url), "pha:jobs", "pha-workers")
    print(
        f"KILL rounds={rounds} sigkills={sum(kills.values())} jobs={len(jobs)} attempts={attempts} "
        f"succeeded={sum(f['state'] == 'succeeded' for f in finished.values())} lost=0 "
        f"registry_entries={len(m['tasks'])} registry_version={m['version']} stream={pending} "
        f"already_registered_on_rerun={registered_by_a_rerun} seconds={time.perf_counter() - started:.1f}"
    )
    assert sum(kills.values()) == rounds
    for job_id, task in jobs.items():
        assert finished[job_id]["state"] == "succeeded", finished[job_id]
        assert finished[job_id]["attempts"] == kills[job_id] + 1, (task, finished[job_id], kills[job_id])
    # Exactly once: one registry entry per job, by that job, and one version per registration.
    assert sorted(m["tasks"]) == sorted(jobs.values())
    assert {t["job_id"] for t in m["tasks"].values()} == set(jobs)
    assert m["version"] == len(jobs) and m["rows"] == len(jobs)  # no other change, no orphan row
    assert pending == {"length": len(jobs), "pending": 0, "lag": 0}  # every entry acknowledged


# ------------------------------------------------------------------------------------- Redis restart
class Traffic:
    """POST /predict back to back from a thread, alternating tasks; records (time, status) of every answer."""

    def __init__(self, client) -> None:
        self.client = client
        self.answers: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        tasks = ("sst2", "rte", "mnli")
        i = 0
        while not self._stop.is_set():
            response = self.client.post("/predict", json={"inputs": TEXT, "task": tasks[i % 3], "max_new_tokens": 2})
            self.answers.append((time.monotonic(), response.status_code))
            i += 1

    def between(self, start: float, end: float) -> Counter[int]:
        return Counter(code for t, code in self.answers if start <= t <= end)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_redis_killed_and_restarted_under_traffic(tiny_checkpoint, aof_redis, tmp_path):
    env = worker_env(tiny_checkpoint, tmp_path, aof_redis.url)
    overrides = app_overrides(env, l1_cache_size=1, redis_timeout_seconds=0.2, redis_backoff_seconds=0.5)
    outage_s = scale("redis_outage_seconds", 3)
    db = redis.Redis.from_url(aof_redis.url)
    with WorkerProcess(env, tmp_path / "worker.log") as worker, running_app(tiny_checkpoint, **overrides) as client:
        long_job = client.post("/adapt", json=adapt_body("cut-by-outage", 6 * STEPS), headers=AUTH).json()["job_id"]
        behind = client.post("/adapt", json=adapt_body("queued-behind", 50), headers=AUTH).json()["job_id"]
        wait_for(lambda: job(client, long_job)["progress"] > 0, 120, "the long job running")
        with Traffic(client) as traffic:
            time.sleep(0.5)
            redis_hits_before = metric(client, "pha_adapter_cache_lookups_total", tier="redis")
            aof_redis.kill()
            down = time.monotonic()
            refused = client.post("/adapt", json=adapt_body("during-outage", 5), headers=AUTH)
            status_read = client.get(f"/jobs/{long_job}")
            ready = client.get("/readyz")
            live = client.get("/livez")
            time.sleep(max(0.0, outage_s - (time.monotonic() - down)))
            worker_survived_outage = worker.alive()
            aof_redis.start()  # same port and folder: the AOF is replayed
            up = time.monotonic()
            wait_for(lambda: client.get("/readyz").json()["redis"] == "ok", 20, "redis ok again")
            time.sleep(1.0)
            redis_hits_after = metric(client, "pha_adapter_cache_lookups_total", tier="redis")
        keys_after_restart = sorted(db.scan_iter(match="pha:adapter:*"))
        db.delete(*keys_after_restart)  # a Redis that came back empty: traffic must refill the cache
        for task in ("sst2", "rte", "mnli") * 2:  # twice round: the one L1 slot holds one of them
            assert client.post("/predict", json={"inputs": TEXT, "task": task}).status_code == 200
        refilled = sorted(db.scan_iter(match="pha:adapter:*"))
        long_done = wait_job(client, long_job, timeout=180, worker=worker)
        behind_done = wait_job(client, behind, timeout=180, worker=worker)
        worker_alive_at_end = worker.alive()

    during = traffic.between(down, up)
    overall = traffic.between(0, float("inf"))
    m = registry_state(tmp_path / "registry")
    print(
        f"REDIS outage={up - down:.1f}s answers_during_outage={dict(during)} answers_total={dict(overall)} "
        f"adapt_while_down={refused.status_code} jobs_read_while_down={status_read.status_code} "
        f"readyz_while_down={ready.json()['redis']} cache_keys_after_restart={len(keys_after_restart)} "
        f"refilled={len(refilled)} cut_job_attempts={long_done['attempts']} queued_job_attempts="
        f"{behind_done['attempts']} worker_survived={worker_survived_outage and worker_alive_at_end} lost=0"
    )
    assert set(overall) == {200} and sum(during.values()) >= 5, (dict(during), dict(overall))
    assert refused.status_code == 503 and refused.headers["retry-after"] and "Redis" in refused.json()["detail"]
    assert status_read.status_code == 503 and "Redis" in status_read.json()["detail"]
    assert ready.status_code == 200 and ready.json()["redis"] == "degraded" and live.status_code == 200
    assert worker_survived_outage and worker_alive_at_end, worker.log_tail()
    assert redis_hits_after > redis_hits_before  # the cache is read from Redis again
    assert len(keys_after_restart) == 3 and len(refilled) == 3
    # The job cut by the outage resumed (second attempt) and the one waiting in the stream ran once.
    assert long_done["state"] == "succeeded" and long_done["attempts"] == 2, long_done
    assert behind_done["state"] == "succeeded" and behind_done["attempts"] == 1, behind_done
    assert sorted(m["tasks"]) == ["cut-by-outage", "queued-behind"] and m["version"] == 2
    assert stream_state(db, "pha:jobs", "pha-workers") == {"length": 2, "pending": 0, "lag": 0}


# -------------------------------------------------------------------------------------- API restart
def test_api_killed_and_restarted_during_a_job(tiny_checkpoint, aof_redis, tmp_path):
    env = worker_env(tiny_checkpoint, tmp_path, aof_redis.url)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()  # loads while the first API does
    first = ApiServer(env, tmp_path / "api-1.log")
    second = ApiServer(env, tmp_path / "api-2.log", port=first.port)
    try:
        first.start()
        with first.client() as c:
            job_id = c.post("/adapt", json=adapt_body("survivor", 4 * STEPS), headers=AUTH).json()["job_id"]
            wait_for(lambda: job(c, job_id)["progress"] > 0, 120, "the job running")
        first.kill()
        killed_at = time.monotonic()
        second.start()
        down_s = time.monotonic() - killed_at
        with second.client() as c:
            done = wait_job(c, job_id, timeout=120, worker=worker)
            wait_for(lambda: c.get("/prototypes/survivor").status_code == 200, 20, "the new task served")
            info = c.get("/prototypes/survivor").json()
            answer = c.post("/predict", json={"inputs": "premise: a. hypothesis: b.", "task": "survivor"})
            ready = c.get("/readyz").json()
    finally:
        for process in (second, first, worker):
            process.stop()
    print(
        f"API-RESTART api_down={down_s:.1f}s job={done['state']} attempts={done['attempts']} "
        f"served_after_restart={info['source']} predict={answer.status_code} registry_version="
        f"{ready['registry_version']}"
    )
    assert done["state"] == "succeeded" and done["attempts"] == 1, done
    assert info["source"] == "adapted" and info["examples"] == 4
    assert answer.status_code == 200 and answer.json()["predictions"][0]["task"] == "survivor"
    assert ready["registry_version"] == 1 and ready["registry_error"] is None


# --------------------------------------------------------------------------------- corrupt registry
def _raw_row(registry: Path, name: str, seq: int, record: bytes, tensors: bytes, checked: str) -> None:
    """Write a row behind the store's back, as a disk fault or a careless operator would."""
    with sqlite3.connect(registry / "registry.sqlite3") as db:
        db.execute(
            "INSERT OR REPLACE INTO tasks (seq, name, record, tensors, digest) VALUES (?, ?, ?, ?, ?)",
            (seq, name, record, tensors, bytes.fromhex(checked)),
        )


def test_corrupt_records_and_an_unreadable_store_are_refused_and_the_rest_served(tiny_checkpoint, tmp_path):
    """A corrupt record is refused and named while every other change is applied; the task keeps its last good
    version. A store that cannot be read at all changes nothing, and a replica starting on it still starts."""
    registry = tmp_path / "registry"
    settings = dict(registry_dir=str(registry), registry_poll_seconds=0.1)
    with running_app(tiny_checkpoint, **settings) as client:
        model = client.get("/readyz").json()["model"]
        register_task(registry, "good", model, seed=1)
        wait_for(lambda: client.get("/prototypes/good").status_code == 200, 10, "good served")
        served = client.get("/prototypes/good").json()["prototype_version"]
        errors_seen: dict[str, str] = {}

        def refused(case: str, write: Callable[[], None], *must_say: str) -> None:
            # counted before the bad row exists: the follower (polling every 0.1 s) may refuse it at once
            before = metric(client, "pha_registry_errors_total")
            write()

            def noticed() -> bool:
                error = client.get("/readyz").json()["registry_error"] or ""
                return all(word in error for word in must_say)

            wait_for(noticed, 10, f"{case} noticed")
            ready = client.get("/readyz")
            errors_seen[case] = ready.json()["registry_error"]
            assert ready.status_code == 200, ready.json()
            assert metric(client, "pha_registry_errors_total") > before
            still = client.get("/prototypes/good")
            assert still.status_code == 200 and still.json()["prototype_version"] == served, (case, still.text)
            assert client.post("/predict", json={"inputs": TEXT, "task": "good"}).status_code == 200

        # A new version of "good" whose tensors were flipped on disk: refused, v1 still served; a task registered
        # after it is served all the same.
        v2 = RegisteredTask(name="good", mode="prototype", job_id="job-v2", model_version=model)
        write = partial(_raw_row, registry, "good", 2, v2.to_json(), b"flipped", "0" * 32)
        refused("corrupt record", write, "'good'", "corrupt")
        register_task(registry, "after", model, seed=3)
        wait_for(lambda: client.get("/prototypes/after").status_code == 200, 10, "the rest served")
        assert "'good'" in client.get("/readyz").json()["registry_error"]

        # A record whose digest is right but whose tensors are not safetensors: refused as not servable.
        bad = RegisteredTask(name="third", mode="prototype", job_id="job-3", model_version=model).to_json()
        write = partial(_raw_row, registry, "third", 4, bad, b"\x00" * 16, digest(bad, b"\x00" * 16))
        refused("tensors that are not safetensors", write, "'third'", "not servable")
        assert client.get("/prototypes/third").status_code == 404

        # Sound tensors, but two label offsets for three labels: refused as not servable, never answered with.
        from pha_core.adapt import AdaptedTensors

        vector = np.ones(16, dtype=np.float32)
        tensors = AdaptedTensors(vector, vector, None).to_bytes()
        odd = RegisteredTask(
            name="fourth",
            mode="prototype",
            job_id="job-4",
            model_version=model,
            labels=["a", "b", "c"],
            label_offsets=[0.5, -0.5],
        ).to_json()
        write = partial(_raw_row, registry, "fourth", 5, odd, tensors, digest(odd, tensors))
        refused("label offsets that do not fit the labels", write, "'fourth'", "2 label offsets for 3 labels")
        assert client.get("/prototypes/fourth").status_code == 404

        # A temperature that is not a number > 0 (a hand-edited or corrupt record): refused the same way.
        for seq, (name, value, says) in enumerate(
            [("fifth", -1.0, "temperature must be a number in"), ("sixth", None, "not servable")], start=6
        ):
            cold = RegisteredTask(
                name=name, mode="prototype", job_id=f"job-{seq}", model_version=model, labels=["a", "b"]
            )
            cold.label_temperature = value  # type: ignore[assignment]
            body = cold.to_json()
            write = partial(_raw_row, registry, name, seq, body, tensors, digest(body, tensors))
            refused(f"label temperature {value}", write, f"'{name}'", says)
            assert client.get(f"/prototypes/{name}").status_code == 404

        # The file's header zeroed: a replica starting on it starts (trained tasks), says why, and serves.
        with sqlite3.connect(registry / "registry.sqlite3") as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file, none in the WAL
        whole = (registry / "registry.sqlite3").read_bytes()
        (registry / "registry.sqlite3").write_bytes(b"\x00" * 100 + whole[100:])
        with running_app(tiny_checkpoint, **settings) as fresh:
            ready = fresh.get("/readyz").json()
            errors_seen["unreadable store"] = ready["registry_error"]
            assert "registry.sqlite3" in ready["registry_error"] and ready["registry_version"] == -1, ready
            assert fresh.post("/predict", json={"inputs": TEXT}).status_code == 200
        (registry / "registry.sqlite3").write_bytes(whole)
        assert client.get("/prototypes/after").status_code == 200
        follower_alive = not client.app.state.pha.follower.done()
        total_errors = metric(client, "pha_registry_errors_total")
    print(f"REGISTRY faults_injected={len(errors_seen)} errors_counted={total_errors:.0f} last_good_served=yes")
    for case, error in errors_seen.items():
        print(f"  {case}: {error}")
    assert follower_alive and len(errors_seen) == 6  # every injected fault was noticed and named
