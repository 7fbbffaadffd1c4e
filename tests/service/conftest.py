"""Fixtures of the service tests (helpers live in tests/support/; `private_redis` in tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.support.app import running_app


@pytest.fixture(scope="module")
def tiny_client(tiny_checkpoint, redis_url):
    """The HTTP app on the tiny checkpoint (tasks sst2, rte, mnli) with the test Redis, one per module."""
    with running_app(tiny_checkpoint, redis_url=redis_url) as client:
        yield client
