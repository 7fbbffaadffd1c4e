"""Run-time changes to the served tasks, behind the routers (as `Predictor` is behind /predict): queue an
adaptation job, read a job, import a task made elsewhere, remove one.

Everything that can be refused is refused here, before anything is queued or written, with a `ServiceError`
that says what to change. The name rule is the catalogue's (`TaskCatalog.conflict`) and is applied again inside
the registry's own transaction, so two writers racing for a name cannot both win. After a write, this replica
applies the registry at once and tells the others (they also poll).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import redis

from pha_core.adapt import AdaptedTensors
from pha_core.inference import Engine
from pha_core.tasks import template_fields

from .adaptation import RegistrySync
from .catalog import TaskCatalog, TaskEntry
from .errors import ServiceError
from .jobs import JOB_ID, JobQueue
from .limits import RequestLimits
from .redis_names import REGISTRY_CHANNEL
from .registry import NameTaken, RegisteredTask, RegistryError, RegistryStore, check_name
from .schemas import FIELD_NAME, AdaptRequest, ImportRequest
from .settings import Settings

log = logging.getLogger("pha.changes")
T = TypeVar("T")


class TaskChanges:
    def __init__(
        self,
        *,
        settings: Settings,
        engine: Engine,
        catalog: TaskCatalog,
        registry: RegistryStore,
        sync: RegistrySync,
        jobs: JobQueue | None,
        limits: RequestLimits,
    ) -> None:
        self.settings, self.engine, self.catalog = settings, engine, catalog
        self.registry, self.sync, self.jobs, self.limits = registry, sync, jobs, limits

    # ------------------------------------------------------------------------------------------ jobs
    async def adapt(self, body: AdaptRequest) -> str:
        """Queue a few-shot adaptation job; returns its id."""
        if self.jobs is None:
            raise ServiceError(
                503, "adaptation needs a job queue: set PHA_REDIS_URL and run `pha worker`", reason="unavailable"
            )
        self._check_job(body)
        return await asyncio.to_thread(self._enqueue, body)

    async def job(self, job_id: str) -> dict | None:
        """A job's record (None: no such job)."""
        if self.jobs is None or not JOB_ID.fullmatch(job_id):
            return None
        return await asyncio.to_thread(_with_redis, "the job store", self.jobs.get, job_id)

    def _enqueue(self, body: AdaptRequest) -> str:
        _with_redis("the job queue", self.jobs.ensure_group)
        return _with_redis("the job queue", self.jobs.enqueue, body)

    def _check_job(self, body: AdaptRequest) -> None:
        s = self.settings
        _check_name(body.task)
        if len(body.examples) > s.max_adapt_examples:
            raise ServiceError(
                422,
                f"{len(body.examples)} examples; at most PHA_MAX_ADAPT_EXAMPLES={s.max_adapt_examples} are accepted",
                reason="invalid",
            )
        if body.steps > s.max_adapt_steps:
            raise ServiceError(
                422, f"steps={body.steps}; at most PHA_MAX_ADAPT_STEPS={s.max_adapt_steps}", reason="invalid"
            )
        if body.heldout is not None and len(body.heldout) > 10 * s.max_adapt_examples:
            raise ServiceError(422, f"at most {10 * s.max_adapt_examples} held-out examples", reason="invalid")
        inputs = [e.input.strip() for e in body.examples]
        duplicates = sorted({i for i in inputs if inputs.count(i) > 1})
        if duplicates:
            raise ServiceError(
                422, f"duplicated example input {duplicates[0][:80]!r}; send each example once", reason="invalid"
            )
        limit = self.limits.max_input_tokens  # the same rule as /predict (PHA_TRUNCATE_INPUTS)
        everything = body.examples + (body.heldout or [])
        for i, n in enumerate(self.engine.count_tokens([e.input for e in everything])):
            if n > limit:
                raise ServiceError(
                    422,
                    f"example {i} has {n} tokens; the limit is {limit} (PHA_MAX_INPUT_TOKENS, capped "
                    "by the model's window unless PHA_TRUNCATE_INPUTS=true)",
                    reason="tokens",
                )
        for target in sorted({e.target for e in everything}):
            if not self.engine.can_represent(target):
                raise ServiceError(
                    422,
                    f"target {target!r} cannot be written by the model's tokenizer (it would come back "
                    "changed); use lower-case words without unusual characters",
                    reason="invalid",
                )
        self._check_conflict(body.task, body.replace)

    # ------------------------------------------------------------------------------ import and removal
    async def import_task(self, name: str, body: ImportRequest) -> tuple[TaskEntry, bool]:
        """Register a prototype-mode task made elsewhere; returns the served entry and whether it is new."""
        vector, key = self._checked_import(name, body)
        existed = self.catalog.get(name) is not None
        entry = RegisteredTask(
            name=name,
            mode="imported",
            job_id="import-" + hashlib.sha256(body.model_dump_json().encode()).hexdigest()[:24],
            model_version=self.engine.model_version,
            k=body.examples or 0,
            labels=body.labels,
            template=body.template,
            spread=list(body.spread) if body.spread is not None else None,
            label_offsets=list(body.label_offsets) if body.label_offsets is not None else None,
            label_temperature=body.label_temperature,
        )
        tensors = AdaptedTensors(vector, key, None).to_bytes()
        try:
            await asyncio.to_thread(self.registry.register, entry, tensors, body.replace)
        except NameTaken as exc:  # another import or job won the name meanwhile
            raise ServiceError(409, str(exc), reason="conflict") from None
        except RegistryError as exc:
            raise _unavailable(exc) from exc
        await self._publish()
        served = self.catalog.get(name)
        if served is None:
            raise ServiceError(503, f"task {name!r} was registered but is not served yet: {self.sync.error}")
        return served, not existed

    async def remove(self, name: str) -> int:
        """Remove an adapted task everywhere; returns the registry version that no longer has it."""
        entry = self.catalog.get(name)
        if entry is not None and entry.source == "trained":
            raise ServiceError(409, f"{name!r} is a trained task of the model and cannot be deleted", reason="conflict")
        try:
            removed = await asyncio.to_thread(self.registry.remove, name) if _name_error(name) is None else None
        except RegistryError as exc:
            raise _unavailable(exc) from exc
        if removed is None:
            raise ServiceError(404, f"no adapted task {name[:64]!r}", reason="task")
        return await self._publish()

    async def _publish(self) -> int:
        """Apply the registry here at once, then tell the other replicas (a lost notice only delays them)."""
        version = await asyncio.to_thread(self.sync.apply)
        if self.jobs is not None:
            try:
                await asyncio.to_thread(self.jobs.r.publish, REGISTRY_CHANNEL, str(version))
            except redis.RedisError as exc:
                log.warning("registry notice not sent", extra={"error": str(exc)})
        return version

    def _checked_import(self, name: str, body: ImportRequest) -> tuple[np.ndarray, np.ndarray]:
        """The prototype and routing key as float32 vectors; every refusal says what to change."""
        _check_name(name)
        self._check_conflict(name, body.replace)
        if body.model is not None and body.model != self.engine.model_version:
            raise ServiceError(
                409,
                f"the prototype was made for model {body.model[:32]!r}; this server runs "
                f"{self.engine.model_version!r}, whose hypernetwork would read it as noise: adapt the task again "
                "on this model",
                reason="conflict",
            )
        dim = self.engine.config.proto_dim
        vectors = []
        key = body.key if body.key is not None else body.vector
        for field_name, values in (("vector", body.vector), ("key", key)):
            v = np.asarray(values, dtype=np.float32)
            if v.shape != (dim,) or not np.all(np.isfinite(v)) or not np.any(v):
                raise ServiceError(
                    422, f"{field_name} must be {dim} finite numbers, not all zero (got {v.size})", reason="invalid"
                )
            vectors.append(v)
        self._check_labels(body.labels)
        if body.template is not None:
            try:
                fields = template_fields(body.template)
            except ValueError:  # unbalanced braces
                fields = ()
            if not fields or not all(FIELD_NAME.fullmatch(f) for f in fields):
                raise ServiceError(
                    422, "template needs placeholders with identifier names, e.g. 'review: {review}'", reason="invalid"
                )
        return vectors[0], vectors[1]

    def _check_labels(self, labels: list[str] | None) -> None:
        if labels is None:
            return
        if not labels or len(set(labels)) != len(labels):
            raise ServiceError(422, "labels must be distinct label words (at least one)", reason="invalid")
        for word in labels:
            if not word.strip() or not self.engine.can_represent(word):
                raise ServiceError(
                    422,
                    f"label {word!r} cannot be written by the model's tokenizer; use plain lower-case words",
                    reason="invalid",
                )

    def _check_conflict(self, name: str, replace: bool) -> None:
        conflict = self.catalog.conflict(name, replace)
        if conflict is not None:
            raise ServiceError(409, conflict, reason="conflict")


def _name_error(name: str) -> str | None:
    """Why `name` cannot be a task's name, or None."""
    try:
        check_name(name)
    except ValueError as exc:
        return str(exc)
    return None


def _check_name(name: str) -> None:
    error = _name_error(name)
    if error is not None:
        raise ServiceError(422, error, reason="invalid")


def _unavailable(exc: Exception) -> ServiceError:
    return ServiceError(503, f"{exc}; retry later", reason="unavailable", headers={"Retry-After": "5"})


def _with_redis(what: str, call: Callable[..., T], *args: object) -> T:
    """Run a job-queue call; Redis being down is a 503 the client can retry, never a 500."""
    try:
        return call(*args)
    except redis.RedisError as exc:
        raise ServiceError(
            503,
            f"{what} (Redis) is unavailable: {exc}; retry later",
            reason="unavailable",
            headers={"Retry-After": "5"},
        ) from exc
