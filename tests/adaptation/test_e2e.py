"""Adaptation end to end: the HTTP API, a real Redis stream, real `pha worker` processes, the registry.

- CB, never trained, adapted from 16 real examples on the demo model: the job succeeds, /predict without a task
  routes CB inputs to the new prototype and answers with CB labels, and a restarted API still serves it.
- A worker SIGKILLed mid-job: a second worker reclaims and finishes the job, which is registered exactly once.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from pha_core.data import load_splits, low_data
from service.registry import all_changes, open_registry
from service.settings import Settings
from tests.support.app import running_app
from tests.support.jobs import wait_job
from tests.support.polling import wait_for
from tests.support.processes import WorkerProcess

pytestmark = [pytest.mark.redis]
KEY = "test-key-" + uuid.uuid4().hex[:8]
AUTH = {"Authorization": f"Bearer {KEY}"}
CB_LABELS = {"entailment", "contradiction", "neutral"}


@pytest.fixture(params=["sqlite"])
def env(request, tmp_path, redis_url):
    """Settings shared by API and workers: a private stream, group and registry per test; the registry store
    is sqlite unless a test asks for both (`@both_stores`)."""
    tag = uuid.uuid4().hex[:8]
    if request.param == "redis":
        clear_redis_registry(redis_url)
        request.addfinalizer(lambda: clear_redis_registry(redis_url))
    return {
        "PHA_REGISTRY_STORE": request.param,
        "PHA_REDIS_URL": redis_url,
        "PHA_REGISTRY_DIR": str(tmp_path / "registry"),
        "PHA_JOB_STREAM": f"pha:test:{tag}",
        "PHA_JOB_GROUP": f"workers-{tag}",
        "PHA_API_KEY": KEY,
        "PHA_LOG_LEVEL": "WARNING",
        "PHA_REGISTRY_POLL_SECONDS": "0.5",
        "PHA_TRUNCATE_INPUTS": "true",  # CB premises run past the 128 tokens the model reads
        "PHA_TORCH_THREADS": "1",  # API and worker share 2 cores: oversubscribed torch threads slow both badly
    }


both_stores = pytest.mark.parametrize("env", ["sqlite", "redis"], indirect=True)


def clear_redis_registry(url: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match="pha:registry:*"))
    if keys:
        client.delete(*keys)


def settings_of(env: dict[str, str]) -> dict[str, str]:
    """PHA_* variables as Settings fields (PHA_REDIS_URL -> redis_url)."""
    return {k.removeprefix("PHA_").lower(): v for k, v in env.items()}


def store_of(env: dict[str, str]):
    return open_registry(Settings(**settings_of(env)))


def api(env: dict[str, str], **extra: str):
    """The app in process, with the settings the workers get."""
    return running_app(**settings_of({**env, **extra}))


def worker(env: dict[str, str], **extra: str) -> WorkerProcess:
    """`pha worker` on these settings (a context manager: started on entry, SIGTERM on exit); its log lies next to
    the test's registry folder."""
    settings = {**env, **extra}
    name = settings.get("PHA_WORKER_NAME", "worker")
    return WorkerProcess(settings, Path(env["PHA_REGISTRY_DIR"]).parent / f"{name}-{uuid.uuid4().hex[:6]}.log")


@pytest.mark.pretrained
@pytest.mark.data
def test_adapt_cb_then_route_to_it_across_an_api_restart(env, data_dir):
    cb = load_splits(["cb"], data_dir)["cb"]
    shots = [{"input": e.input, "target": e.target} for e in low_data(cb["train"], n=16, seed=0)]
    held = [e for e in cb["test"] + cb["validation"] if len(e.input) < 400][:12]
    with worker(env), api(env) as client:
        refused = client.post("/adapt", json={"task": "cb", "examples": shots})
        assert refused.status_code == 401
        r = client.post("/adapt", json={"task": "cb", "examples": shots, "steps": 120}, headers=AUTH)
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"])
        assert job["state"] == "succeeded", job
        assert job["result"]["source_task"] == "mnli" and job["attempts"] == 1
        wait_for(lambda: client.get("/prototypes/cb").status_code == 200)
        preds = client.post("/predict", json={"inputs": [e.input for e in held]}).json()["predictions"]
        routed = [p for p in preds if p["task"] == "cb"]
        assert len(routed) >= 0.75 * len(held), [p["task"] for p in preds]
        assert all(p["routed"] and p["output"] in CB_LABELS for p in routed), routed
        listed = {p["name"]: p for p in client.get("/prototypes").json()["prototypes"]}
        assert listed["cb"]["source"] == "adapted" and listed["cb"]["examples"] == 16
    with api(env) as restarted:  # a fresh replica catches up from the registry
        assert restarted.get("/prototypes/cb").json()["source"] == "adapted"
        pinned = restarted.post("/predict", json={"inputs": held[0].input, "task": "cb"}).json()
        assert pinned["predictions"][0]["output"] in CB_LABELS


@both_stores
def test_worker_killed_mid_job_is_finished_by_another_and_registered_once(env, tiny_checkpoint):
    env = {**env, "PHA_CHECKPOINT": str(tiny_checkpoint), "PHA_JOB_IDLE_MS": "1500"}
    shots = [
        {"input": f"premise: case {i}. hypothesis: claim {i}.", "target": t}
        for i, t in enumerate(["entailment", "neutral", "contradiction", "entailment"])
    ]
    with api(env) as client:
        with worker(env, PHA_WORKER_NAME="doomed") as first:
            r = client.post("/adapt", json={"task": "newtask", "examples": shots, "steps": 1000}, headers=AUTH)
            job_id = r.json()["job_id"]
            running = wait_job(client, job_id, check=lambda j: j["state"] == "running" and j["progress"] > 0)
            assert running["state"] == "running" and running["worker"] == "doomed"
            first.kill()
        with worker(env, PHA_WORKER_NAME="rescuer"):
            job = wait_job(client, job_id)
        assert job["state"] == "succeeded", job
        assert job["worker"] == "rescuer" and job["attempts"] == 2
        store = store_of(env)
        stored = list(all_changes(store))
        assert store.head() == 1 and [c.name for c in stored] == ["newtask"]  # registered once
        assert stored[0].task.job_id == job_id
        store.close()
        wait_for(lambda: client.get("/prototypes/newtask").status_code == 200)


def test_bad_adapt_requests_queue_nothing(env, tiny_checkpoint, redis_url):
    import redis

    env = {**env, "PHA_CHECKPOINT": str(tiny_checkpoint)}
    ok = [{"input": "premise: a. hypothesis: b.", "target": "entailment"}]
    bad = [
        ({"task": "cb", "examples": []}, 422),
        ({"task": "../etc", "examples": ok}, 422),
        ({"task": "a/b", "examples": ok}, 422),
        ({"task": "bad\nname", "examples": ok}, 422),
        ({"task": "cb", "examples": ok * 2}, 422),  # duplicated example
        ({"task": "cb", "examples": [{"input": "  ", "target": "x"}]}, 422),
        ({"task": "cb", "examples": [{"input": "x", "target": "caf\u00e9 \u2603"}]}, 422),  # not representable
        ({"task": "cb", "examples": ok, "steps": 10**6}, 422),
        ({"task": "cb", "examples": ok * 0 + [{"input": f"t {i}", "target": "y"} for i in range(65)]}, 422),
        ({"task": "cb", "examples": ok, "mode": "magic"}, 422),
        ({"task": "sst2", "examples": ok}, 409),  # a trained task
    ]
    with api(env) as client:
        for body, code in bad:
            r = client.post("/adapt", json=body, headers=AUTH)
            assert r.status_code == code, (body, r.text)
            assert r.json()["detail"]
        assert client.get("/jobs/" + "0" * 32).status_code == 404
        assert client.get("/jobs/not-a-job").status_code == 404
        assert client.delete("/prototypes/sst2", headers=AUTH).status_code == 409
        assert client.delete("/prototypes/nothing", headers=AUTH).status_code == 404
        assert client.delete("/prototypes/nothing").status_code == 401
        assert client.delete("/prototypes/nothing", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = redis.Redis.from_url(redis_url)
    assert r.exists(env["PHA_JOB_STREAM"]) == 0 or r.xlen(env["PHA_JOB_STREAM"]) == 0
    store = store_of(env)
    assert store.head() == 0, "a refused request registered something"
    store.close()


def test_mutations_are_refused_without_a_configured_key(env, tiny_checkpoint):
    env = {**env, "PHA_CHECKPOINT": str(tiny_checkpoint), "PHA_API_KEY": ""}
    ok = [{"input": "premise: a. hypothesis: b.", "target": "entailment"}]
    with api(env) as client:
        r = client.post("/adapt", json={"task": "cb", "examples": ok}, headers=AUTH)
        assert r.status_code == 403 and "PHA_API_KEY" in r.json()["detail"]
    with api(env, PHA_DEV_MODE="true") as client:
        assert client.post("/adapt", json={"task": "cb", "examples": ok}).status_code == 202


@both_stores
def test_delete_removes_an_adapted_task_everywhere(env, tiny_checkpoint):
    env = {**env, "PHA_CHECKPOINT": str(tiny_checkpoint)}
    shots = [
        {"input": "premise: a. hypothesis: b.", "target": "entailment"},
        {"input": "premise: c. hypothesis: d.", "target": "neutral"},
    ]
    with worker(env), api(env) as one, api(env) as two:
        job_id = one.post("/adapt", json={"task": "temp", "examples": shots, "steps": 5}, headers=AUTH).json()["job_id"]
        assert wait_job(one, job_id)["state"] == "succeeded"
        wait_for(lambda: two.get("/prototypes/temp").status_code == 200)
        conflict = one.post("/adapt", json={"task": "temp", "examples": shots}, headers=AUTH)
        assert conflict.status_code == 409 and "replace" in conflict.json()["detail"]
        assert one.delete("/prototypes/temp", headers=AUTH).status_code == 200
        wait_for(lambda: two.get("/prototypes/temp").status_code == 404)  # the other replica follows


def test_a_job_that_keeps_failing_ends_failed_with_its_error(env, tiny_checkpoint, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("the registry cannot live here")
    env = {**env, "PHA_CHECKPOINT": str(tiny_checkpoint), "PHA_JOB_IDLE_MS": "1000", "PHA_JOB_MAX_ATTEMPTS": "2"}
    shots = [{"input": "premise: a. hypothesis: b.", "target": "entailment"}]
    with api(env) as client, worker({**env, "PHA_REGISTRY_DIR": str(blocker)}):
        job_id = client.post("/adapt", json={"task": "doomed", "examples": shots, "steps": 3}, headers=AUTH)
        job = wait_job(client, job_id.json()["job_id"], timeout=60)
    assert job["state"] == "failed" and job["attempts"] == 2
    assert "Error" in job["error"] and "not-a-folder" in job["error"]
