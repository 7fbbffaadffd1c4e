"""Real processes for tests and benches: the API (`pha serve`), `pha worker`s, any server that answers /readyz.

Servers bind 127.0.0.1. Every process is a child of the caller and is stopped by its own pid (never by name).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
# `pha` as this interpreter runs it: the checkout's code, whatever `pha` on PATH points at.
PHA = (sys.executable, "-m", "pha_cli")


def environ_without_pha() -> dict[str, str]:
    """The caller's environment without any PHA_* variable, so no setting leaks in from the shell."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PHA_")}


def child_env(settings: dict[str, str]) -> dict[str, str]:
    """environ_without_pha(), offline, plus `settings`.

    PYTHONPATH puts this checkout first, so the children run this tree's code whatever `pip install -e` points at.
    """
    env = environ_without_pha()
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
    """One child process writing its stdout and stderr to `log` (appended: a restart keeps the earlier lines)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.cmd, self.env, self.log = list(cmd), env, log
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


class HttpServer(Child):
    """A child serving HTTP on 127.0.0.1:`port`; start() returns once GET /readyz answers 200."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, port: int, name: str = "server") -> None:
        self.name = name  # for the messages
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        super().__init__(cmd, env, log)

    def start(self, timeout: float = 300) -> HttpServer:
        super().start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise
        return self

    def wait_ready(self, timeout: float = 300) -> dict:
        """The /readyz body once it answers 200; a RuntimeError with the log's tail if the server exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                response = httpx.get(f"{self.base}/readyz", timeout=5)
                if response.status_code == 200:
                    return response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} at {self.base} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=30, **kwargs)


class ApiServer(HttpServer):
    """`pha serve` on a free loopback port (or `port`) with the given PHA_* settings."""

    def __init__(self, settings: dict[str, str], log: Path, port: int | None = None) -> None:
        port = port or free_port()
        cmd = [*PHA, "serve", "--host", "127.0.0.1", "--port", str(port)]
        super().__init__(cmd, child_env(settings), log, port, name="pha serve")


class WorkerProcess(Child):
    """`pha worker` with the given PHA_* settings."""

    def __init__(self, settings: dict[str, str], log: Path) -> None:
        super().__init__([*PHA, "worker"], child_env(settings), log)
