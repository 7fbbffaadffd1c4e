"""A redis-server of the caller alone, on a free port and in its own folder: killing it never disturbs another Redis.

The AOF is on by default (as docker-compose.yml runs Redis), so a restart on the same folder brings the job stream
back; tests of an outage that need no persistence turn it off.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.support.polling import wait_for
from tests.support.ports import free_port
from tests.support.processes import Child


def needs_redis_server() -> None:
    """Skip (with the reason) where the redis-server binary is missing: the caller starts private servers."""
    import pytest  # here, not at the top: bench scripts import this module without pytest

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not installed")


def wait_until_redis_answers(port: int, server: Child, timeout: float = 20) -> None:
    """Return once the redis-server `server` answers PING on `port` (it does only once its AOF is loaded)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)

    def answers() -> bool:
        if not server.alive():
            raise RuntimeError(f"redis-server exited ({server.process.returncode}):\n{server.log_tail()}")
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    wait_for(answers, timeout, f"PING of redis-server on port {port}")


class PrivateRedis(Child):
    """redis-server on 127.0.0.1:`port` with its files (and log) in `folder`; `url` is its database 0."""

    def __init__(
        self, folder: Path, appendonly: bool = True, appendfsync: str = "everysec", options: tuple[str, ...] = ()
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        # appendfsync "always": every acknowledged write is on disk (the registry store's need)
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""]
        cmd += ["--appendonly", "yes" if appendonly else "no", "--appendfsync", appendfsync, *options]
        super().__init__(cmd, dict(os.environ), folder / "redis.log")

    def start(self, timeout: float = 20) -> PrivateRedis:
        """Start (again, after a kill: same port and folder, so the AOF is replayed) and wait for PING."""
        super().start()
        try:
            wait_until_redis_answers(self.port, self, timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()  # SIGKILL: a crash. Writes reach the AOF at once (fsync once a second), so none is lost
