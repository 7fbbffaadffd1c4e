"""The app in process: a real app behind a real HTTP client, and its metrics.

`running_app` serves a checkpoint through Starlette's TestClient (httpx over ASGI, lifespan included), so every
test goes through the same middleware, validation, batcher and model thread as production.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.main import create_app
from service.settings import Settings
from tests.support.polling import wait_for


@contextmanager
def running_app(checkpoint: Path | str | None = None, **overrides: object) -> Iterator[TestClient]:
    """An app on `checkpoint` (None: the server's default model); settings default to no Redis, so PHA_* variables
    of the shell never leak in."""
    values = {"redis_url": "", "log_level": "WARNING", **overrides}
    if checkpoint is not None:
        values["checkpoint"] = str(checkpoint)
    with TestClient(create_app(Settings(**values))) as client:
        yield client


@contextmanager
def model_thread_busy(client: TestClient) -> Iterator[None]:
    """Occupy the app's one model thread until the block ends: requests pile up behind it, as under load."""
    release = threading.Event()
    runner = client.app.state.pha.runner

    async def occupy() -> None:
        await runner(release.wait)

    done = client.portal.start_task_soon(occupy)
    try:
        yield
    finally:
        release.set()
        done.result(timeout=10)


def predictions(client: TestClient, **body: object) -> list[dict]:
    """POST /predict with `body`; the predictions of its 200 answer."""
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def metric(client: TestClient, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0.0 when absent)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for_metric(client: TestClient, name: str, value: float, timeout: float = 10) -> None:
    wait_for(lambda: metric(client, name) >= value, timeout, f"{name} reaching {value}", interval=0.01)
