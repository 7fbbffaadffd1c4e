"""The registry of adapted tasks: the durable source of truth every replica follows (see store.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .records import NAME_PATTERN, Change, NameTaken, RegisteredTask, RegistryError, check_name, name_taken
from .sqlite import SqliteRegistry
from .store import PAGE, RegistryStore, all_changes, live, pages

if TYPE_CHECKING:
    import redis

    from ..settings import Settings

__all__ = [
    "NAME_PATTERN",
    "PAGE",
    "Change",
    "NameTaken",
    "RegisteredTask",
    "RegistryError",
    "RegistryStore",
    "SqliteRegistry",
    "all_changes",
    "check_name",
    "live",
    "name_taken",
    "open_registry",
    "pages",
]


def open_registry(settings: Settings, client: redis.Redis | None = None) -> RegistryStore:
    """The store PHA_REGISTRY_STORE names: `sqlite` (a file in PHA_REGISTRY_DIR) or `redis` (PHA_REDIS_URL;
    `client`, when given, is the process's blocking client, shared with its job queue)."""
    if settings.registry_store == "redis":
        if not settings.redis_url:
            raise RegistryError("PHA_REGISTRY_STORE=redis needs PHA_REDIS_URL (a Redis with AOF persistence)")
        from .redis_store import RedisRegistry

        return RedisRegistry(settings.redis_url, client)
    return SqliteRegistry.in_folder(settings.registry_dir)
