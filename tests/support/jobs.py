"""Waiting for an /adapt job, through any client of the API (httpx.Client or Starlette's TestClient)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.support.processes import Child

FINISHED = ("succeeded", "failed")


def wait_job(
    client: httpx.Client,
    job_id: str,
    timeout: float = 180,
    until: tuple[str, ...] = FINISHED,
    worker: Child | None = None,
    check: Callable[[dict], bool] | None = None,
) -> dict:
    """Poll GET /jobs/{id} until the job's state is in `until` or `check(job)` holds, and return the job.

    Non-200 answers (503 while Redis is down) are waited out. Fails at once, with its log, if `worker` (the one
    that should run the job) has died, and after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/jobs/{job_id}")
        if response.status_code == 200 and _done(response.json(), until, check):
            return response.json()
        if worker is not None and not worker.alive():
            raise AssertionError(f"the worker died (status {worker.process.returncode}):\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not {until} after {timeout} s: {response.status_code} {response.text}")
        time.sleep(0.1)


def _done(job: dict, until: tuple[str, ...], check: Callable[[dict], bool] | None) -> bool:
    return job["state"] in until or (check is not None and check(job))
