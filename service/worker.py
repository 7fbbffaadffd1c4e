"""`pha worker`: runs /adapt jobs from the Redis stream and registers the new tasks.

It loads the same checkpoint as the API (PHA_CHECKPOINT, else the demo), on PHA_DEVICE (`auto` takes the GPU
when there is one). For each job: adapt (pha_core.adapt), score held-out examples if given, register in the
registry (durable), publish a notice so every API replica reloads, then acknowledge. See jobs.py for the
delivery guarantees; registration is idempotent by job id, so a job delivered twice registers once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import redis

from pha_core.adapt import AdaptedTensors, adapt_task, score_adapted, vectors_of_many
from pha_core.tasks import Example

from .jobs import Delivery, JobQueue
from .loader import LoadedModel, load_model
from .logging import configure_logging
from .redis_client import connect
from .redis_names import REGISTRY_CHANNEL
from .registry import Change, RegisteredTask, RegistryError, RegistryStore, name_taken, open_registry, pages
from .routing import PrototypeIndex
from .settings import Settings

log = logging.getLogger("pha.worker")
PROGRESS_EVERY_S = 1.0  # how often a running job writes its progress and re-claims its stream entry
REDIS_RETRY_S = 1.0  # while Redis is unreachable, how often the worker tries again


class PermanentJobError(ValueError):
    """A job that can never succeed (bad request, name conflict): fail it now, do not retry."""


@dataclass
class Worker:
    settings: Settings
    loaded: LoadedModel
    queue: JobQueue
    registry: RegistryStore
    client: redis.Redis
    name: str
    rivals: Rivals
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, once: bool = False) -> None:
        """Take jobs until stopped. A Redis outage is waited out: the job in hand stays pending in the stream and
        is reclaimed once Redis is back (its attempt counts), so a Redis restart never ends the worker."""
        connected, failing = False, False
        try:  # the rivals caught up before the first job, whose lease (PHA_JOB_IDLE_MS) a million keys could outlast
            self.rivals.refresh()
        except RegistryError as exc:  # the first job tries again, and fails with this error if it persists
            log.warning("registry not read at start", extra={"error": str(exc)})
        while not self.stop.is_set():
            try:
                if not connected:
                    self.queue.ensure_group()  # again after an outage: a Redis without persistence lost the group
                    connected, failing = True, False
                    log.info("worker ready", extra={"worker": self.name, "stream": self.queue.stream})
                delivery = self.queue.claim(block_ms=1000)
                if delivery is None:
                    continue
                self.handle(delivery)
            except redis.RedisError as exc:
                if not failing:  # log the outage once, not every retry
                    log.warning("redis unavailable; retrying every second", extra={"error": str(exc)})
                connected, failing = False, True
                self.stop.wait(REDIS_RETRY_S)
                continue
            if once:
                return

    def handle(self, d: Delivery) -> None:
        extra = {"job_id": d.job_id, "task": d.job.task, "attempt": d.attempts}
        if d.attempts > self.queue.max_attempts:
            previous = (self.queue.get(d.job_id) or {}).get("error", "the worker died or timed out")
            self._fail(d, f"gave up after {self.queue.max_attempts} attempts; last error: {previous}")
            return
        self.queue.update(d.job_id, state="running", started=time.time(), worker=self.name)
        log.info("job started", extra=extra)
        try:
            result = self.execute(d)
        except PermanentJobError as exc:
            self._fail(d, str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure is recorded on the job, then retried or failed
            log.exception("job attempt failed", extra=extra)
            if d.attempts >= self.queue.max_attempts:
                self._fail(d, f"{type(exc).__name__}: {exc}")
            else:  # stays pending: reclaimed by a worker after PHA_JOB_IDLE_MS
                self.queue.update(d.job_id, state="queued", error=f"{type(exc).__name__}: {exc}")
        else:
            self.queue.update(d.job_id, state="succeeded", finished=time.time(), progress=1.0, result=result)
            self.queue.ack(d)
            log.info("job succeeded", extra={**extra, "seconds": result["seconds"]})

    def _fail(self, d: Delivery, error: str) -> None:
        self.queue.update(d.job_id, state="failed", finished=time.time(), error=error)
        self.queue.ack(d)
        log.warning("job failed", extra={"job_id": d.job_id, "error": error})

    def execute(self, d: Delivery) -> dict:
        p = d.job
        engine = self.loaded.engine
        examples = [Example(e.input, e.target, p.task) for e in p.examples]
        try:
            existing = self.registry.get(p.task)
            self.rivals.refresh()
        except RegistryError as exc:
            raise RuntimeError(str(exc)) from exc
        taken = existing is not None and existing.task is not None and existing.task.job_id != d.job_id
        if taken and not p.replace:
            raise PermanentJobError(str(name_taken(p.task)))
        other_keys = self.rivals.near(engine, examples, exclude=p.task)
        last = [0.0]

        def progress(step: int, loss: float) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or step == p.steps:
                last[0] = now
                self.queue.update(d.job_id, progress=step / p.steps, loss=loss)
                self.queue.touch(d)

        started = time.perf_counter()
        result = adapt_task(
            engine.model,
            examples,
            engine.trained_prototypes(),
            engine.tasks,
            mode=p.mode,
            steps=p.steps,
            seed=p.seed,
            progress=progress,
            other_keys=other_keys,
            labels=sorted({e.target for e in examples}),  # registered with the prior fitted on them
        )
        heldout = None
        if p.heldout:
            held = [Example(e.input, e.target, p.task) for e in p.heldout]
            heldout = score_adapted(engine.model, result, held, engine.trained_prototypes())
        entry = RegisteredTask.adapted(
            p.task,
            result,
            job_id=d.job_id,
            model_version=engine.model_version,
            heldout=heldout,
        )
        try:
            registered, created = self.registry.register(entry, AdaptedTensors.of(result).to_bytes(), replace=p.replace)
        except ValueError as exc:  # NameTaken (another job won the name meanwhile), an invalid name
            raise PermanentJobError(str(exc)) from exc
        version = registered.seq
        self.client.publish(REGISTRY_CHANNEL, str(version))
        return {
            "source_task": result.source_task,
            "source_score": result.source_score,
            "final_loss": result.final_loss,
            "k": result.k,
            "steps": result.steps,
            "mode": result.mode,
            "seconds": time.perf_counter() - started,
            "adapt_seconds": result.seconds,
            "heldout": heldout,
            "registry_version": version,
            "registered": created,
            "created": registered.created,
        }


class Rivals:
    """The routing keys of the adapted tasks, followed incrementally from the registry: the new task's key is
    trained (L_Pro) to keep clear of the `MAX_RIVALS` nearest of them, not of every one (a million keys would
    cost each training step more than the task itself)."""

    MAX_RIVALS = 1024

    def __init__(self, registry: RegistryStore, model_version: str, n_layers: int, dim: int) -> None:
        self.registry, self.model_version, self.n_layers = registry, model_version, n_layers
        self.keys = PrototypeIndex(dim)
        self.cursor = 0

    def refresh(self) -> None:
        """Apply the registry's changes since the last refresh in one index update: a worker starting on a
        million tasks indexes them in bulk (tensors decoded a page at a time, the cells cut once): 24 s for 1M
        (bench/scale.py, session 16), where key by key took 90 s for the first 809k, past a job's 60 s lease."""
        added: dict[str, np.ndarray] = {}
        dropped: set[str] = set()  # removed, foreign, unreadable or unusable: out of the rivals
        cursor = self.cursor
        for page in pages(self.registry, self.cursor):
            cursor = page[-1].seq
            ours = [c.task is not None and c.task.model_version == self.model_version for c in page]
            decoded = vectors_of_many([c.tensors if mine else None for c, mine in zip(page, ours, strict=True)])
            for change, mine, vectors in zip(page, ours, decoded, strict=True):
                key = self._key(change, vectors) if mine else None
                if key is not None:
                    added[change.name] = key
                    dropped.discard(change.name)
                else:
                    added.pop(change.name, None)
                    dropped.add(change.name)
        names = list(added)
        good = self.keys.valid(np.stack(list(added.values()))) if names else np.zeros(0, bool)
        dropped.update(name for name, fine in zip(names, good, strict=True) if not fine)
        for name in dropped:
            self.keys.remove(name)
        self.keys.upsert_many((name, added[name], None) for name, fine in zip(names, good, strict=True) if fine)
        self.cursor = cursor

    def _key(self, change: Change, vectors: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray | None:
        """The change's routing key (flat, `dim` numbers; `vectors`: decoded with its page), or None when it has
        none that can be used."""
        if vectors is not None:
            key = vectors[1]
        else:  # another layout, adapters, or corrupt bytes: read alone
            try:
                key = AdaptedTensors.from_bytes(change.tensors or b"", self.n_layers).key
            except ValueError as exc:
                log.warning("skipping unreadable registry entry", extra={"task": change.name, "error": str(exc)})
                return None
        return np.reshape(key, -1) if np.size(key) == self.keys.dim else None

    def near(self, engine, examples: list[Example], exclude: str) -> np.ndarray | None:
        if not len(self.keys):
            return None
        if len(self.keys) <= self.MAX_RIVALS:
            return self.keys.nearest_keys(np.ones(self.keys.dim, np.float32), len(self.keys), exclude)
        z = engine.encode([e.input for e in examples]).z
        return self.keys.nearest_keys(np.asarray(z).mean(axis=0), self.MAX_RIVALS, exclude)


def worker_name(settings: Settings) -> str:
    return settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"


def build_worker(settings: Settings) -> Worker:
    if not settings.redis_url:
        raise SystemExit("pha worker: PHA_REDIS_URL is not set; the worker reads its jobs from a Redis stream")
    client = connect(settings.redis_url)
    name = worker_name(settings)
    queue = JobQueue(
        client,
        settings.job_stream,
        settings.job_group,
        consumer=name,
        idle_ms=settings.job_idle_ms,
        max_attempts=settings.job_max_attempts,
    )
    loaded = load_model(settings)
    registry = open_registry(settings, client)
    engine = loaded.engine
    rivals = Rivals(registry, engine.model_version, engine.model.n_decoder_layers, engine.config.proto_dim)
    return Worker(settings, loaded, queue, registry, client, name, rivals)


def run_worker(once: bool = False) -> int:
    settings = Settings()
    configure_logging(settings.log_level)
    worker = build_worker(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop.set())  # finish the job in hand, then exit
    worker.run(once=once)
    return 0
