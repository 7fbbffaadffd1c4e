"""The API side of adaptation: keeping the catalogue in step with the registry, on every replica.

The registry (a folder on a shared volume) is the source of truth. `RegistrySync.apply()` reads its manifest
and, when the version moved, upserts new or changed adapted tasks into the catalogue (which patches the FAISS
index and drops stale cached adapters) and removes those that are gone. It runs at start-up (a restarted replica
catches up), on each Redis notice from a worker or another replica, and every `registry_poll_seconds` in case
a notice was missed. A corrupt registry is logged and counted; the replica keeps serving its last good version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from pha_core.adapt import AdaptedTensors
from pha_core.calibration import Spread

from .catalog import TaskCatalog
from .metrics import Metrics
from .registry import RegisteredTask, Registry, RegistryError

log = logging.getLogger("pha.adaptation")
REGISTRY_CHANNEL = "pha:registry"


class RegistrySync:
    def __init__(
        self, registry: Registry, catalog: TaskCatalog, model_version: str, n_layers: int, metrics: Metrics
    ) -> None:
        self.metrics = metrics
        self.registry = registry
        self.catalog = catalog
        self.model_version = model_version
        self.n_layers = n_layers
        self.version = -1  # nothing applied yet
        self.error: str | None = None

    def apply(self) -> int:
        """Bring the catalogue to the registry's version; returns it. Raises nothing: errors are recorded."""
        try:
            snap = self.registry.snapshot()
            if snap.version == self.version:
                self.error = None  # a manifest repaired to the version served: nothing is wrong any more
                return self.version
            wanted = {n: t for n, t in snap.tasks.items() if t.model_version == self.model_version}
            for name, task in snap.tasks.items():
                if name not in wanted:
                    log.warning(
                        "registry task was adapted on another model; not served",
                        extra={"task": name, "task_model": task.model_version},
                    )
            # Every file is read and checked before the catalogue changes: a bad version changes nothing.
            loaded = {name: self._read(task) for name, task in wanted.items()}
            for entry in self.catalog.entries():
                if entry.source == "adapted" and entry.name not in wanted:
                    self.catalog.remove(entry.name)
            for name, task in wanted.items():
                tensors = loaded[name]
                self.catalog.upsert(
                    name,
                    tensors.prototype,
                    key=tensors.key,
                    adapters=tensors.adapters,
                    labels=task.labels,
                    template=task.template,
                    examples=task.k,
                    spread=Spread(*task.spread) if task.spread else None,
                )
        except Exception as exc:  # noqa: BLE001 - RegistryError, bad tensors, anything: an escape would end the follower
            self.error = str(exc) if isinstance(exc, RegistryError) else f"{type(exc).__name__}: {exc}"
            self.metrics.registry_errors.inc()
            log.error("registry not applied; serving the last good version", extra={"error": str(exc)})
            return self.version
        self.version, self.error = snap.version, None
        self.metrics.registry_version.set(snap.version)
        return self.version

    def _read(self, task: RegisteredTask) -> AdaptedTensors:
        data = self.registry.read_tensors(task)  # checks the sha256; its error names the file
        try:
            return AdaptedTensors.from_bytes(data, self.n_layers)
        except ValueError as exc:
            path = self.registry.root / "tasks" / task.file
            raise RegistryError(f"registry file {path} of task {task.name!r} is not readable: {exc}") from exc


async def follow_registry(sync: RegistrySync, redis_url: str, poll_seconds: float) -> None:
    """Apply the registry on every notice, and at least every `poll_seconds`; runs until cancelled."""
    client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=1) if redis_url else None
    pubsub = None
    try:
        while True:
            try:
                if client is not None and pubsub is None:
                    pubsub = client.pubsub(ignore_subscribe_messages=True)
                    await pubsub.subscribe(REGISTRY_CHANNEL)
                if pubsub is not None:
                    await pubsub.get_message(timeout=poll_seconds)
                else:
                    await asyncio.sleep(poll_seconds)
            except (aioredis.RedisError, OSError) as exc:  # Redis down: keep polling the registry folder
                log.warning("registry notices unavailable; polling", extra={"error": str(exc)})
                pubsub = await _close(pubsub)
                await asyncio.sleep(poll_seconds)
            await asyncio.to_thread(sync.apply)
    finally:
        await _close(pubsub)
        if client is not None:
            await client.aclose()


async def _close(pubsub) -> None:
    if pubsub is not None:
        with contextlib.suppress(Exception):
            await pubsub.aclose()
    return None
