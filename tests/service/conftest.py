"""Fixtures of the service tests (helpers live in service_helpers.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from service_helpers import PrivateRedis, running_app


@pytest.fixture(scope="module")
def tiny_client(tiny_checkpoint, redis_url):
    """The HTTP app on the tiny checkpoint (tasks sst2, rte, mnli) with the test Redis, one per module."""
    with running_app(tiny_checkpoint, redis_url=redis_url) as client:
        yield client


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not installed")
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()
