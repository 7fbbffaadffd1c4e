"""Fixtures of the reliability tests: real processes on loopback (tests/support/) and a private Redis with the AOF.

The long variants of these tests are scripts (bench/load.py, bench/fuzz.py, bench/soak.py); the tests run short,
bounded versions of the same code. Every process they start is their own child, stopped by its pid.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import PrivateRedis, needs_redis_server


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test alone (AOF on, as deployed): it may be killed and restarted at will."""
    needs_redis_server()
    with PrivateRedis(tmp_path / "redis") as server:
        yield server
