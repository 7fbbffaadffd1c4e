"""Shared test fixtures: where the real data lies, a real Redis connection, a private Redis, tiny checkpoints.

Nothing here mocks a part: tests that need the GLUE files or Redis are skipped with a reason when those are
absent on a developer's machine, and CI provides both (see .ci/run).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import PrivateRedis, needs_redis_server
from tests.support.tiny import save_tiny_checkpoint

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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny PHA checkpoint with tasks sst2, rte, mnli (proto_dim 16)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_no_retriever_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model as the `no_retriever` variant: it cannot route, tasks must be named."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-no-retriever", variant="no_retriever")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test alone (no AOF): it may be stopped and restarted without touching the shared one."""
    needs_redis_server()
    with PrivateRedis(tmp_path / "redis", appendonly=False) as server:
        yield server
