"""Fixtures of the reliability tests: the bench/ helpers (real processes on loopback) and a private Redis.

The long variants of these tests are scripts (bench/load.py, bench/fuzz.py, bench/soak.py); the tests run short,
bounded versions of the same code. Every process they start is their own child, stopped by its pid.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # procs, load, fuzz
sys.path.insert(0, str(ROOT / "tests" / "service"))  # service_helpers: running_app, metric

from procs import PrivateRedis  # noqa: E402
from reliability_helpers import needs_redis_server  # noqa: E402


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test alone (AOF on, as deployed): it may be killed and restarted at will."""
    needs_redis_server()
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()
