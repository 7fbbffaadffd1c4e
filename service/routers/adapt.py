"""POST /adapt, GET /jobs/{id}, DELETE /prototypes/{name}: run-time task changes (API key required)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response, status

from ..deps import ApiKey, StateDep
from ..errors import ServiceError
from ..jobs import JOB_ID
from ..registry import RegistryError, check_name
from ..schemas import AdaptRequest, Deleted, JobAccepted, JobStatus
from ..state import AppState

router = APIRouter(tags=["adaptation"])


@router.post(
    "/adapt",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={401: {}, 403: {}, 409: {}, 503: {}},
)
async def adapt(body: AdaptRequest, state: StateDep, _: ApiKey, response: Response) -> JobAccepted:
    """Queue a few-shot adaptation job: k examples of a new task in, a new prototype registered by a worker."""
    if state.jobs is None:
        raise ServiceError(
            503, "adaptation needs a job queue: set PHA_REDIS_URL and run `pha worker`", reason="unavailable"
        )
    _validate(body, state)
    job_id = await asyncio.to_thread(_enqueue, state, body)
    response.headers["Location"] = f"/jobs/{job_id}"
    return JobAccepted(job_id=job_id, state="queued", task=body.task)


def _with_redis(what: str, call, *args):
    """Run a job-queue call; Redis being down is a 503 the client can retry, never a 500."""
    import redis

    try:
        return call(*args)
    except redis.RedisError as exc:
        raise ServiceError(
            503,
            f"{what} (Redis) is unavailable: {exc}; retry later",
            reason="unavailable",
            headers={"Retry-After": "5"},
        ) from exc


def _enqueue(state: AppState, job: AdaptRequest) -> str:
    _with_redis("the job queue", state.jobs.ensure_group)
    return _with_redis("the job queue", state.jobs.enqueue, job)


def _job_record(state: AppState, job_id: str) -> dict | None:
    return _with_redis("the job store", state.jobs.get, job_id)


def _validate(body: AdaptRequest, state: AppState) -> None:
    s = state.settings
    try:
        check_name(body.task)
    except ValueError as exc:
        raise ServiceError(422, str(exc), reason="invalid") from None
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
    limit = state.predictor.limits.max_input_tokens  # the same rule as /predict (PHA_TRUNCATE_INPUTS)
    everything = body.examples + (body.heldout or [])
    for i, n in enumerate(state.engine.count_tokens([e.input for e in everything])):
        if n > limit:
            raise ServiceError(
                422,
                f"example {i} has {n} tokens; the limit is {limit} (PHA_MAX_INPUT_TOKENS, capped "
                "by the model's window unless PHA_TRUNCATE_INPUTS=true)",
                reason="tokens",
            )
    for target in sorted({e.target for e in everything}):
        if not state.engine.can_represent(target):
            raise ServiceError(
                422,
                f"target {target!r} cannot be written by the model's tokenizer (it would come back "
                "changed); use lower-case words without unusual characters",
                reason="invalid",
            )
    conflict = state.catalog.conflict(body.task, body.replace)
    if conflict is not None:
        raise ServiceError(409, conflict, reason="conflict")


@router.get("/jobs/{job_id}", response_model=JobStatus, responses={404: {}, 503: {}})
async def get_job(job_id: str, state: StateDep) -> JobStatus:
    """State, progress, source prototype and score, final loss, held-out metrics, timings or error of a job."""
    record = None
    if state.jobs is not None and JOB_ID.fullmatch(job_id):
        record = await asyncio.to_thread(_job_record, state, job_id)
    if record is None:
        raise ServiceError(
            404,
            f"no job {job_id[:64]!r} (job ids are 32 hex characters from POST /adapt; finished "
            "jobs are kept for a week)",
            reason="task",
        )
    return JobStatus(job_id=job_id, **record)


@router.delete("/prototypes/{name}", response_model=Deleted, responses={401: {}, 403: {}, 404: {}, 409: {}})
async def delete_prototype(name: str, state: StateDep, _: ApiKey) -> Deleted:
    """Remove an adapted task from the registry and every replica. Trained tasks are protected."""
    entry = state.catalog.get(name)
    if entry is not None and entry.source == "trained":
        raise ServiceError(409, f"{name!r} is a trained task of the model and cannot be deleted", reason="conflict")
    try:
        removed = await asyncio.to_thread(state.registry.remove, name) if _valid(name) else None
    except RegistryError as exc:
        raise ServiceError(503, f"{exc}; retry later", reason="unavailable", headers={"Retry-After": "5"}) from exc
    if removed is None:
        raise ServiceError(404, f"no adapted task {name[:64]!r}", reason="task")
    version = await asyncio.to_thread(state.sync.apply)
    await state.notify_registry(version)
    return Deleted(name=name, registry_version=version)


def _valid(name: str) -> bool:
    try:
        check_name(name)
    except ValueError:
        return False
    return True
