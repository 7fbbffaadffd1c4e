"""The job queue on a real Redis stream: delivery, acknowledgement, reclaiming a dead worker's job."""

import time
import uuid

import pytest
import redis

from service.jobs import JobQueue
from service.schemas import AdaptRequest

pytestmark = pytest.mark.redis


@pytest.fixture
def client(redis_url):
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


@pytest.fixture
def stream(client):
    name = f"pha:test-jobs:{uuid.uuid4().hex}"
    yield name
    client.delete(name)


def _payload(task="cb"):
    return AdaptRequest(task=task, examples=[{"input": "x", "target": "y"}], mode="prototype", steps=5, seed=0)


def test_enqueue_claim_ack(client, stream):
    api = JobQueue(client, stream, "g", consumer="api")
    api.ensure_group()
    api.ensure_group()  # idempotent
    job_id = api.enqueue(_payload())
    assert api.get(job_id)["state"] == "queued"
    worker = JobQueue(client, stream, "g", consumer="w1")
    d = worker.claim(block_ms=100)
    assert d.job_id == job_id and d.attempts == 1 and d.job.task == "cb"
    assert worker.claim(block_ms=100) is None  # nothing else is waiting
    worker.update(job_id, state="succeeded", result={"ok": True})
    worker.ack(d)
    assert client.xpending(stream, "g")["pending"] == 0
    assert api.get(job_id)["result"] == {"ok": True}
    assert client.ttl(f"pha:job:{job_id}") > 0  # finished records expire


def test_a_dead_workers_job_is_reclaimed_after_the_idle_time(client, stream):
    api = JobQueue(client, stream, "g")
    api.ensure_group()
    job_id = api.enqueue(_payload())
    dead = JobQueue(client, stream, "g", consumer="dead", idle_ms=200)
    assert dead.claim(block_ms=100).job_id == job_id  # ... and never acks
    alive = JobQueue(client, stream, "g", consumer="alive", idle_ms=200)
    assert alive.claim(block_ms=50) is None  # not idle long enough yet
    time.sleep(0.3)
    d = alive.claim(block_ms=50)
    assert d.job_id == job_id and d.attempts == 2


def test_touch_keeps_a_live_workers_job(client, stream):
    api = JobQueue(client, stream, "g")
    api.ensure_group()
    api.enqueue(_payload())
    busy = JobQueue(client, stream, "g", consumer="busy", idle_ms=300)
    d = busy.claim(block_ms=100)
    other = JobQueue(client, stream, "g", consumer="other", idle_ms=300)
    for _ in range(3):
        time.sleep(0.15)
        busy.touch(d)
        assert other.claim(block_ms=10) is None


def test_lag_counts_waiting_and_pending(client, stream):
    q = JobQueue(client, stream, "g", consumer="w")
    q.ensure_group()
    q.enqueue(_payload())
    q.enqueue(_payload())
    assert q.lag() == 2
    q.claim(block_ms=10)
    assert q.lag() == 2  # one waiting, one in flight
