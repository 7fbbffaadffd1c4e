"""docker-compose.yml really starts the system: its services run as local processes (bench/compose_local.py),
with the commands and environment the compose file gives them, and answer /readyz, /predict and an /adapt job."""

from __future__ import annotations

import secrets
import shutil
import signal

import pytest

from bench import compose_local as bench
from tests.support.deployfiles import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    api_key = secrets.token_urlsafe(24)
    s = bench.LocalCompose(ROOT / "docker-compose.yml", tmp_path_factory.mktemp("compose"), {"PHA_API_KEY": api_key})
    s.api_key = api_key
    try:
        s.start_all(timeout=180)
        yield s
    finally:
        s.stop()


def test_environment_comes_from_the_compose_file(stack):
    env = stack.environment(stack.api)
    assert env["PHA_API_KEY"] == stack.api_key
    assert env["PHA_REDIS_URL"] == f"redis://127.0.0.1:{stack.ports[stack.redis]}/0"
    assert env["PHA_REGISTRY_DIR"].startswith(str(stack.workdir)), "named volume -> a folder of the test"
    assert env["HF_HUB_OFFLINE"] == "1", "the image's ENV applies"
    assert stack.environment(stack.worker)["PHA_REGISTRY_DIR"] == env["PHA_REGISTRY_DIR"], "one shared registry"


def test_health_and_predict(stack):
    ready = bench.check_health(stack)
    assert ready["redis"] == "ok", ready
    body = bench.check_predict(stack)
    assert body["model"] == ready["model"]


def test_adapt_job_runs_through_the_worker(stack):
    reason = bench.adapt_unavailable(stack)
    if reason:
        pytest.skip(reason)
    result = bench.check_adapt(stack, stack.api_key, timeout=120)
    assert result["job"]["state"] == "succeeded"


def test_services_stop_cleanly(stack):
    codes = stack.stop()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: -SIGTERM is its normal exit
    assert codes[stack.api] in (0, -signal.SIGTERM), stack.procs[stack.api].log_tail()
    assert codes[stack.redis] == 0, stack.procs[stack.redis].log_tail()
    if stack.worker in codes:
        assert codes[stack.worker] in (0, -signal.SIGTERM), stack.procs[stack.worker].log_tail()
    assert (stack.workdir / "volumes" / "redis-data" / "appendonlydir").is_dir(), "appendonly is on"
