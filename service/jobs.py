"""Adaptation jobs on a Redis Stream with a consumer group: at-least-once, never lost, never looping.

    API      enqueue(): job hash `pha:job:<id>` (state "queued") + XADD to the stream, in one MULTI/EXEC.
    worker   claim(): first XAUTOCLAIM entries idle longer than `idle_ms` (their worker died), else XREADGROUP.
             Each delivery increments the job's `attempts`; past `max_attempts` the job ends "failed".
             A job is XACKed only after it is registered (or has failed for good), so a worker killed mid-job
             leaves it pending for another worker to reclaim. While a job runs, `touch()` re-claims it to its
             own worker, resetting the idle time, so a slow job is not stolen from a live worker.
Job records hold progress and results for `GET /jobs/{id}`; they expire `record_ttl` seconds after the end.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from .redis_names import JOB_KEY
from .schemas import AdaptRequest

log = logging.getLogger("pha.jobs")
JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as enqueue() makes them
TERMINAL = ("succeeded", "failed")


@dataclass
class Delivery:
    entry_id: str
    job_id: str
    job: AdaptRequest  # the request as the API accepted it, validated again on this end
    attempts: int


class JobQueue:
    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        consumer: str = "api",
        idle_ms: int = 60_000,
        max_attempts: int = 3,
        record_ttl: int = 7 * 24 * 3600,
    ) -> None:
        self.r = client
        self.stream, self.group, self.consumer = stream, group, consumer
        self.idle_ms, self.max_attempts, self.record_ttl = idle_ms, max_attempts, record_ttl

    def ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ----------------------------------------------------------------------------------------- API side
    def enqueue(self, job: AdaptRequest) -> str:
        job_id = uuid.uuid4().hex
        now = time.time()
        record = {
            "state": "queued",
            "task": job.task,
            "created": now,
            "attempts": 0,
            "progress": 0.0,
            "steps": job.steps,
            "mode": job.mode,
            "k": len(job.examples),
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(JOB_KEY.format(job_id), mapping={k: json.dumps(v) for k, v in record.items()})
        pipe.xadd(self.stream, {"job_id": job_id, "payload": job.model_dump_json()})
        pipe.execute()
        return job_id

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(JOB_KEY.format(job_id))
        if not raw:
            return None
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def update(self, job_id: str, **fields: Any) -> None:
        key = JOB_KEY.format(job_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, mapping={k: json.dumps(v) for k, v in fields.items()})
        if fields.get("state") in TERMINAL:
            pipe.expire(key, self.record_ttl)
        pipe.execute()

    def lag(self) -> int:
        """Entries waiting or in flight for the group (for metrics and autoscaling)."""
        pending = self.r.xpending(self.stream, self.group)["pending"]
        groups = {g["name"].decode(): g for g in self.r.xinfo_groups(self.stream)}
        lag = groups.get(self.group, {}).get("lag") or 0
        return int(pending) + int(lag)

    # -------------------------------------------------------------------------------------- worker side
    def claim(self, block_ms: int = 1000) -> Delivery | None:
        """The next job for this consumer: a reclaimed stale one first, else a new one; None after `block_ms`."""
        _, reclaimed, _ = self.r.xautoclaim(self.stream, self.group, self.consumer, self.idle_ms, "0-0", count=1)
        entries = reclaimed
        if not entries:
            got = self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=1, block=block_ms)
            entries = got[0][1] if got else []
        for entry_id, fields in entries:
            if not fields:  # the entry was trimmed away: nothing to run
                self.r.xack(self.stream, self.group, entry_id)
                continue
            try:  # JSON only, into the typed job: nothing read from Redis is unpickled or evaluated
                job_id = fields[b"job_id"].decode()
                if not JOB_ID.fullmatch(job_id):
                    raise ValueError("not a job id the API makes")
                job = AdaptRequest.model_validate_json(fields[b"payload"])
            except (KeyError, ValueError) as exc:  # a poison entry would otherwise end every worker that takes it
                self._discard(entry_id, fields, exc)
                continue
            attempts = self.r.hincrby(JOB_KEY.format(job_id), "attempts", 1)
            return Delivery(entry_id.decode(), job_id, job, attempts)
        return None

    def _discard(self, entry_id: bytes, fields: dict, exc: Exception) -> None:
        job_id = fields.get(b"job_id", b"").decode("utf-8", "replace")
        if JOB_ID.fullmatch(job_id) and self.r.exists(JOB_KEY.format(job_id)):
            self.update(job_id, state="failed", finished=time.time(), error=f"unreadable job entry: {exc}")
        self.r.xack(self.stream, self.group, entry_id)
        log.warning("unreadable job entry discarded", extra={"entry": entry_id.decode(), "error": str(exc)})

    def touch(self, delivery: Delivery) -> None:
        """Reset the entry's idle time: this worker is alive and still on it."""
        self.r.xclaim(self.stream, self.group, self.consumer, 0, [delivery.entry_id], justid=True)

    def ack(self, delivery: Delivery) -> None:
        self.r.xack(self.stream, self.group, delivery.entry_id)
