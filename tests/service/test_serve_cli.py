"""`pha serve` on a fresh install: no settings but a port, a real uvicorn process, one POST /predict."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import httpx
import pytest
from service_helpers import free_port

from service.loader import demo_checkpoint

pytestmark = pytest.mark.pretrained
START_TIMEOUT_S = 180


def test_pha_serve_without_settings_answers_predict(tmp_path):
    pha = shutil.which("pha")
    if pha is None:
        pytest.skip("the `pha` command is not installed (pip install -e .)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHA_")}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([pha, "serve", "--port", str(port)], env=env, stdout=log, stderr=log)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"pha serve exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"pha serve not ready:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
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
        process.send_signal(signal.SIGTERM)  # our own child, by its pid
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
