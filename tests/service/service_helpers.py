"""Helpers of the service tests: a real app behind a real HTTP client, its metrics, a private Redis.

`running_app` serves a checkpoint through Starlette's TestClient (httpx over ASGI, lifespan included), so every
test goes through the same middleware, validation, batcher and model thread as production.
(Imported by module name, like tests/tiny.py: the test folders are not packages.)
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.main import create_app
from service.settings import Settings


@contextmanager
def running_app(checkpoint: Path, **overrides: object) -> Iterator[TestClient]:
    """An app on `checkpoint`; settings default to no Redis, so PHA_* variables of the shell never leak in."""
    values = {"checkpoint": str(checkpoint), "redis_url": "", "log_level": "WARNING", **overrides}
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


def wait_for_metric(client: TestClient, name: str, value: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while metric(client, name) < value:
        assert time.monotonic() < deadline, f"{name} did not reach {value}"
        time.sleep(0.01)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of this test alone, on a free port: stopping it never disturbs the shared one."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # our own child, by its pid
            self.process.wait(timeout=10)
            self.process = None
