"""Waiting for something another thread or process does: poll, with a deadline, never an unbounded sleep."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], object], timeout: float = 20, what: str = "condition", interval: float = 0.05):
    """Return once `predicate()` is true; an AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(interval)
