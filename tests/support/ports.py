"""Free loopback ports for the servers that tests and benches start."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on now (the OS picks it; another process could take it before the caller binds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
