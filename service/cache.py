"""The adapter cache: an in-process LRU (L1) in front of Redis (L2), and regeneration behind both.

Adapters are cheap to regenerate from (hypernetwork, prototype), so Redis is a cache and never the only copy:
any Redis error is counted, logged and answered by regenerating. After an error Redis is skipped for
`backoff` seconds, so a dead Redis costs one short timeout per back-off period, not one per request.

Keys are `pha:adapter:{model_version}:{task}:{prototype_version}`: a new model or a new prototype can never read
an old entry. Values are safetensors bytes (`AdapterSet.to_bytes`), parsed without unpickling anything.
All methods run on the event loop; the L1 and the single-flight table are touched only from there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Literal

from pha_core.inference import AdapterSet

from .catalog import TaskEntry
from .redis_client import connect_async
from .redis_names import ADAPTER_PREFIX
from .telemetry import Metrics

log = logging.getLogger("pha.cache")

Tier = Literal["l1", "redis", "regenerated"]
RedisState = Literal["ok", "degraded", "disabled"]
KEY_PREFIX = ADAPTER_PREFIX


def adapter_key(model_version: str, entry: TaskEntry) -> str:
    return f"{KEY_PREFIX}:{model_version}:{entry.name}:{entry.prototype_version}"


class RedisTier:
    """Redis GET/SET of adapter bytes with short timeouts, no client retries, and a back-off after errors."""

    def __init__(self, url: str, *, timeout: float, ttl: int, backoff: float, metrics: Metrics) -> None:
        self._client = connect_async(url, timeout=timeout, retries=False)
        self._ttl = ttl
        self._backoff = backoff
        self._metrics = metrics
        self._skip_until = 0.0
        self.last_error: str | None = None
        metrics.redis_up.set(1)

    @property
    def state(self) -> RedisState:
        return "degraded" if self.last_error is not None else "ok"

    def _available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, exc: Exception, action: str) -> None:
        self._metrics.redis_errors.inc()
        self._metrics.redis_up.set(0)
        if self.last_error is None:  # log the transition, not every call of an outage
            log.warning(
                "redis unavailable, serving from memory and regenerating", extra={"action": action, "error": _text(exc)}
            )
        self.last_error = f"{action}: {_text(exc)}"
        self._skip_until = time.monotonic() + self._backoff

    def _succeeded(self) -> None:
        if self.last_error is not None:
            log.info("redis reachable again", extra={"previous_error": self.last_error})
        self.last_error = None
        self._metrics.redis_up.set(1)

    async def get(self, key: str) -> bytes | None:
        """The value, or None on a miss, an error, or while backing off."""
        from redis.exceptions import RedisError

        if not self._available():
            return None
        try:
            value = await self._client.get(key)
        except (RedisError, OSError) as exc:
            self._failed(exc, "get")
            return None
        self._succeeded()
        return value

    async def set(self, key: str, value: bytes) -> None:
        from redis.exceptions import RedisError

        if not self._available():
            return
        try:
            await self._client.set(key, value, ex=self._ttl)
        except (RedisError, OSError) as exc:
            self._failed(exc, "set")
            return
        self._succeeded()

    async def delete(self, *keys: str) -> None:
        from redis.exceptions import RedisError

        if not keys or not self._available():
            return
        try:
            await self._client.delete(*keys)
        except (RedisError, OSError) as exc:
            self._failed(exc, "delete")

    async def ping(self) -> RedisState:
        """Probe Redis (for /readyz) unless backing off; returns the resulting state."""
        from redis.exceptions import RedisError

        if self._available():
            try:
                await self._client.ping()
                self._succeeded()
            except (RedisError, OSError) as exc:
                self._failed(exc, "ping")
        return self.state

    async def close(self) -> None:
        await self._client.aclose()


class AdapterCache:
    """`get_or_create(entry, generate)`: L1, then Redis, then `generate` (once per key, even when concurrent)."""

    def __init__(
        self,
        *,
        model_version: str,
        n_layers: int,
        l1_size: int,
        redis: RedisTier | None,
        metrics: Metrics,
        l1_bytes: int | None = None,
    ) -> None:
        self.model_version = model_version
        self.redis = redis
        self._n_layers = n_layers
        self._l1_size = l1_size
        self._l1_budget = l1_bytes  # None: bounded by count only
        self._l1_bytes = 0
        self._l1: OrderedDict[str, AdapterSet] = OrderedDict()
        self._pending: dict[str, asyncio.Future[AdapterSet]] = {}
        self._background: set[asyncio.Task] = set()
        self._metrics = metrics
        # The loop that owns the L1; catalogue changes arriving from other threads are handed to it.
        self._loop = _running_loop()

    @property
    def redis_state(self) -> RedisState:
        return "disabled" if self.redis is None else self.redis.state

    def __len__(self) -> int:
        return len(self._l1)

    async def get_or_create(
        self, entry: TaskEntry, generate: Callable[[TaskEntry], Awaitable[AdapterSet]]
    ) -> tuple[AdapterSet, Tier]:
        key = adapter_key(self.model_version, entry)
        hit = self._l1_get(key)
        if hit is not None:
            return self._count(hit, "l1")
        pending = self._pending.get(key)
        if pending is not None:  # another batch is fetching this key: share its result
            return self._count(await asyncio.shield(pending), "l1")
        future: asyncio.Future[AdapterSet] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            adapters, tier = await self._fetch(key, entry, generate)
            future.set_result(adapters)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            del self._pending[key]
        return self._count(adapters, tier)

    async def _fetch(
        self, key: str, entry: TaskEntry, generate: Callable[[TaskEntry], Awaitable[AdapterSet]]
    ) -> tuple[AdapterSet, Tier]:
        adapters = await self._redis_get(key)
        tier: Tier = "redis"
        if adapters is None:
            adapters, tier = await generate(entry), "regenerated"
            if self.redis is not None:
                await self.redis.set(key, adapters.to_bytes())
        self._l1_put(key, adapters)
        return adapters, tier

    async def _redis_get(self, key: str) -> AdapterSet | None:
        if self.redis is None:
            return None
        data = await self.redis.get(key)
        if data is None:
            return None
        try:
            return AdapterSet.from_bytes(data, self._n_layers)
        except ValueError as exc:  # corrupt or foreign bytes under our key: regenerate and overwrite
            log.warning("discarding an unreadable cached adapter set", extra={"key": key, "error": str(exc)})
            return None

    def drop_task(self, task: str) -> None:
        """Forget every cached version of `task` (its prototype changed or it was removed)."""
        prefix = f"{KEY_PREFIX}:{self.model_version}:{task}:"
        stale = [k for k in self._l1 if k.startswith(prefix)]
        for key in stale:
            self._l1_bytes -= self._l1.pop(key).nbytes
        if self.redis is not None and stale:
            # Redis entries would only expire (their key names a prototype that no longer exists): delete them
            # in the background, as a courtesy to memory, without holding up the caller.
            self._spawn(self.redis.delete(*stale))

    def on_catalog_change(self, old: TaskEntry | None, new: TaskEntry | None) -> None:
        """Catalogue listener: a replaced or removed task's adapters are stale."""
        if old is None:
            return
        if self._loop is not None and _running_loop() is not self._loop:
            self._loop.call_soon_threadsafe(self.drop_task, old.name)
        else:
            self.drop_task(old.name)

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        loop = _running_loop()
        if loop is None:  # called outside the event loop: the TTL will clean up
            coro.close()
            return
        task = loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _l1_get(self, key: str) -> AdapterSet | None:
        adapters = self._l1.get(key)
        if adapters is not None:
            self._l1.move_to_end(key)
        return adapters

    def _l1_put(self, key: str, adapters: AdapterSet) -> None:
        old = self._l1.pop(key, None)
        if old is not None:
            self._l1_bytes -= old.nbytes
        self._l1[key] = adapters
        self._l1_bytes += adapters.nbytes
        over_budget = self._l1_budget is not None and self._l1_bytes > self._l1_budget
        while len(self._l1) > 1 and (len(self._l1) > self._l1_size or over_budget):
            _, evicted = self._l1.popitem(last=False)
            self._l1_bytes -= evicted.nbytes
            over_budget = self._l1_budget is not None and self._l1_bytes > self._l1_budget

    @property
    def l1_bytes(self) -> int:
        """Bytes of the adapter sets in L1 now."""
        return self._l1_bytes

    def _count(self, adapters: AdapterSet, tier: Tier) -> tuple[AdapterSet, Tier]:
        self._metrics.cache_lookups.labels(tier).inc()
        return adapters, tier

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self.redis is not None:
            await self.redis.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
