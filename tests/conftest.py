"""Shared test fixtures: where the real data lies, and a real Redis connection.

Nothing here mocks a part: tests that need the GLUE files or Redis are skipped with a reason when those are
absent on a developer's machine, and CI provides both (see .ci/run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    return Path(os.environ.get("PHA_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real GLUE/SuperGLUE files; tests marked `data` skip when the folder is absent."""
    path = _data_dir()
    if not (path / "SST-2").is_dir():
        pytest.skip(f"real data not found at {path} (set PHA_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A real Redis on a test database; skipped (with the reason) when none answers."""
    url = os.environ.get("PHA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"no Redis at {url}: {exc}")
    return url
