"""Fixtures of the service tests (helpers live in service_helpers.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from service_helpers import PrivateRedis


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
