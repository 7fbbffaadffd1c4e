"""The one place Redis connections are made: each process's clients come from here, with their timeouts.

An API process holds three: one blocking client shared by the job queue and the redis registry store (called from
worker threads), the adapter cache's asyncio pool (short timeouts, no retries: it is only a cache), and the
registry follower's pub/sub connection. A worker holds one blocking client.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

CONNECT_TIMEOUT_S = 1.0  # a Redis that does not answer a connect within a second is down for our purposes


def connect(url: str, timeout: float = 5.0) -> redis.Redis:
    """A blocking client (job queue, registry store): `timeout` seconds per call."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=CONNECT_TIMEOUT_S)


def connect_async(url: str, timeout: float | None = None, retries: bool = True) -> aioredis.Redis:
    """An asyncio client. `retries=False`: the client's default retries (several, with back-off) would multiply
    a dead Redis's timeout per call, which a cache in front of regeneration must not pay."""
    options: dict = {"socket_connect_timeout": CONNECT_TIMEOUT_S if timeout is None else timeout}
    if timeout is not None:
        options["socket_timeout"] = timeout
    if not retries:
        options["retry"] = Retry(NoBackoff(), 0)
    return aioredis.Redis(connection_pool=aioredis.ConnectionPool.from_url(url, **options))
