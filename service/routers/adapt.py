"""POST /adapt, GET /jobs/{id}, DELETE /prototypes/{name}: run-time task changes (API key required)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from ..deps import ApiKey, StateDep
from ..errors import ServiceError
from ..schemas import AdaptRequest, Deleted, JobAccepted, JobStatus

router = APIRouter(tags=["adaptation"])


@router.post(
    "/adapt",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={401: {}, 403: {}, 409: {}, 503: {}},
)
async def adapt(body: AdaptRequest, state: StateDep, _: ApiKey, response: Response) -> JobAccepted:
    """Queue a few-shot adaptation job: k examples of a new task in, a new prototype registered by a worker."""
    job_id = await state.changes.adapt(body)
    response.headers["Location"] = f"/jobs/{job_id}"
    return JobAccepted(job_id=job_id, state="queued", task=body.task)


@router.get("/jobs/{job_id}", response_model=JobStatus, responses={404: {}, 503: {}})
async def get_job(job_id: str, state: StateDep) -> JobStatus:
    """State, progress, source prototype and score, final loss, held-out metrics, timings or error of a job."""
    record = await state.changes.job(job_id)
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
    version = await state.changes.remove(name)
    return Deleted(name=name, registry_version=version)
