"""Real processes for the reliability tests and scripts: the API (`pha serve`), `pha worker`s, a private Redis.

Everything binds to 127.0.0.1 on a free port. Every process is a child of the caller and is stopped by its own
pid (never by name). Used by tests/reliability/ and by bench/load.py, bench/fuzz.py and bench/soak.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(settings: dict[str, str]) -> dict[str, str]:
    """The caller's environment without any PHA_* variable (none leaks in from the shell), plus `settings`.

    PYTHONPATH puts this checkout first, so the children run this tree's code whatever `pip install -e` points at.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHA_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(settings)
    return env


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS of /proc/<pid>/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Child:
    """One child process writing its stdout and stderr to `log`."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.cmd, self.env, self.log = cmd, env, log
        self.process: subprocess.Popen | None = None

    def start(self) -> Child:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:  # the child keeps its own descriptor
            self.process = subprocess.Popen(self.cmd, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a lost node would."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (a graceful stop), then SIGKILL after `timeout`; returns the exit status."""
        if self.process is None:
            return None
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> Child:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ApiServer(Child):
    """`pha serve` on a free loopback port with the given PHA_* settings."""

    def __init__(self, settings: dict[str, str], log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pha_core.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(cmd, child_env(settings), log)

    def start(self, timeout: float = 300) -> ApiServer:
        super().start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise
        return self

    def wait_ready(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"API exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                response = httpx.get(f"{self.base}/readyz", timeout=5)
                if response.status_code == 200:
                    return response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"API not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=30, **kwargs)


class WorkerProcess(Child):
    """`pha worker` with the given PHA_* settings."""

    def __init__(self, settings: dict[str, str], log: Path) -> None:
        super().__init__([sys.executable, "-m", "pha_core.cli", "worker"], child_env(settings), log)


class PrivateRedis:
    """A redis-server of the caller alone, on a free port, with the AOF on (as docker-compose.yml runs it), so a
    restart on the same folder brings the job stream back. Stopping it never disturbs any other Redis."""

    def __init__(self, folder: Path, appendonly: bool = True, appendfsync: str = "everysec") -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.appendonly = appendonly
        self.appendfsync = appendfsync  # "always": every acknowledged write is on disk (the registry store's need)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> PrivateRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        cmd += ["--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync]
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 - the server writes to it until stopped
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if client.ping():  # answers only once the AOF is loaded
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: a crash. Writes reach the AOF file at once (fsync once a second), so none is lost."""
        if self.process is not None:
            self.process.kill()  # our own child, by its pid
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def wait_job(
    client: httpx.Client, job_id: str, timeout: float = 120, until=("succeeded", "failed"), worker: Child | None = None
) -> dict:
    """Poll GET /jobs/{id} until the job is in one of `until` (503s while Redis is down are waited out); fails at
    once, with its log, if `worker` (the one that should run it) has died."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/jobs/{job_id}")
        if response.status_code == 200 and response.json()["state"] in until:
            return response.json()
        if worker is not None and not worker.alive():
            raise AssertionError(f"the worker died (status {worker.process.returncode}):\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not {until} after {timeout} s: {response.status_code} {response.text}")
        time.sleep(0.1)


def write_json(path: Path | None, figures: dict) -> None:
    text = json.dumps(figures, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
