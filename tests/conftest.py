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


def tiny_serving_config(variant: str = "pha"):
    """A tiny random PHA model (seconds to build): the serving tests' model."""
    from pha_core.config import BackboneConfig, PHAConfig

    backbone = BackboneConfig(
        kind="minilm",
        random_init=True,
        decoder_layers=1,
        overrides=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    )
    return PHAConfig(
        backbone=backbone,
        tasks=["sst2", "rte", "mnli"],
        variant=variant,
        bottleneck=8,
        proto_dim=16,
        retriever_hidden=16,
        project_hidden=16,
        hyper_dim=8,
    )


def _save_tiny(path: Path, variant: str = "pha") -> Path:
    import torch

    from pha_core.checkpoint import save_checkpoint
    from pha_core.model import PHAModel

    # A fixed seed makes the checkpoint (and so its model version and cache keys) the same on every run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = PHAModel(tiny_serving_config(variant))
    return save_checkpoint(model, path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny PHA checkpoint with tasks sst2, rte, mnli (proto_dim 16)."""
    return _save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_no_retriever_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model as the `no_retriever` variant: it cannot route, tasks must be named."""
    return _save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-no-retriever", variant="no_retriever")
