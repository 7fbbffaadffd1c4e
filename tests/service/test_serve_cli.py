"""`pha serve` on a fresh install: no settings but a port, a real uvicorn process, one POST /predict."""

from __future__ import annotations

import shutil

import httpx
import pytest

from service.loader import demo_checkpoint
from tests.support.ports import free_port
from tests.support.processes import HttpServer, environ_without_pha

pytestmark = pytest.mark.pretrained
START_TIMEOUT_S = 180


def test_pha_serve_without_settings_answers_predict(tmp_path):
    pha = shutil.which("pha")
    if pha is None:
        pytest.skip("the `pha` command is not installed (pip install -e .)")
    port = free_port()
    log_path = tmp_path / "serve.log"
    cmd = [pha, "serve", "--port", str(port)]
    server = HttpServer(cmd, environ_without_pha(), log_path, port, name="pha serve").start(START_TIMEOUT_S)
    try:
        base = server.base
        response = httpx.post(f"{base}/predict", json={"inputs": "sentence: a fine film"}, timeout=60)
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert prediction["routed"] is True and prediction["task"]
        ready = httpx.get(f"{base}/readyz", timeout=5).json()
        assert ready["redis"] == "disabled"
        if not demo_checkpoint().is_dir():
            assert ready["model_source"] == "untrained-default"
            assert "UNTRAINED" in log_path.read_text()
    finally:
        server.stop()  # SIGTERM, then SIGKILL after 30 s
